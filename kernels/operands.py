"""Shape checks of the LoRA op's operands, and their one normalised (sliced) form.

The op fuses `n` projections that share the input x (q/k/v, or gate/up) into one call; a single projection is
the case n = 1. Slice i owns the columns offsets[i] .. offsets[i] + sizes[i] of y and of B's out dimension.
The weights are checked once, when their operands are made (a LoRA layer does it at construction); each call
then checks only its activations x and y against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class LoraOperands(NamedTuple):
    """The op's weights in sliced form, with where each slice's output columns lie."""

    A: torch.Tensor  # [n, S, R, in]: shrink weights per slice and slot, zero- (or garbage-) padded beyond rank
    B: torch.Tensor  # [S, out_total, R]: expand weights per slot, slices concatenated along out; any strides
    scales: torch.Tensor  # [n, S] float32
    ranks: torch.Tensor  # [n, S] int32: real rank per slice and slot, <= R
    offsets: tuple[int, ...]  # first column of each slice in y and B
    sizes: tuple[int, ...]  # columns of each slice
    cpu_kernel_layout: bool  # float32 CPU weights with A's in and B's out innermost: the CPU kernel reads them


def lora_operands(
    A: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    slice_sizes: Sequence[int] | None = None,
) -> LoraOperands:
    """Check the weights' shapes, dtypes and devices; return the sliced form (A [S,R,in] becomes [1,S,R,in]...).

    A: [S, R, in] or [n, S, R, in]; B: [S, out_total, R]; scales, ranks: [S] or [n, S];
    slice_sizes: columns per slice summing to out_total (None: one slice).
    """
    if A.dim() == 3:
        A, scales, ranks = A.unsqueeze(0), scales.reshape(1, -1), ranks.reshape(1, -1)
    if A.dim() != 4 or B.dim() != 3:
        raise ValueError(f"expected A [n,S,R,in] and B [S,out,R]; got A {tuple(A.shape)}, B {tuple(B.shape)}")
    n, S, R, _ = A.shape
    sizes = tuple(slice_sizes) if slice_sizes is not None else (B.shape[1],)
    if (
        B.shape[0] != S
        or B.shape[2] != R
        or len(sizes) != n
        or sum(sizes) != B.shape[1]
        or scales.shape != (n, S)
        or ranks.shape != (n, S)
    ):
        raise ValueError(
            f"inconsistent LoRA operands: A {tuple(A.shape)}, B {tuple(B.shape)}, scales {tuple(scales.shape)}, "
            f"ranks {tuple(ranks.shape)}, slice_sizes {sizes}"
        )
    if A.dtype != B.dtype:
        raise TypeError(f"A and B must share one dtype, got {A.dtype} and {B.dtype}")
    if scales.dtype != torch.float32 or ranks.dtype != torch.int32:
        raise TypeError(f"scales must be float32 and ranks int32, got {scales.dtype} and {ranks.dtype}")
    if len({t.device for t in (A, B, scales, ranks)}) != 1:
        raise ValueError("all LoRA operands must be on one device")
    offsets = tuple(sum(sizes[:i]) for i in range(n))
    cpu_kernel_layout = (
        A.device.type == "cpu"
        and A.dtype == torch.float32
        and A.stride(3) == 1
        and B.stride(1) == 1
        and scales.is_contiguous()
        and ranks.is_contiguous()
    )
    return LoraOperands(A, B, scales, ranks, offsets, sizes, cpu_kernel_layout)


def check_activations(y: torch.Tensor, x: torch.Tensor, ops: LoraOperands) -> None:
    """Check x [T, in] and y [T, out_total] against the operands: shapes, dtype (the weights'), device."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != ops.A.shape[3] or y.shape != (x.shape[0], ops.B.shape[1]):
        raise ValueError(
            f"expected x [T, {ops.A.shape[3]}] and y [T, {ops.B.shape[1]}]; got x {tuple(x.shape)}, y {tuple(y.shape)}"
        )
    if x.dtype != ops.A.dtype or y.dtype != ops.A.dtype:
        raise TypeError(f"x and y must have the weights' dtype {ops.A.dtype}, got {x.dtype} and {y.dtype}")
    if x.device != ops.A.device or y.device != ops.A.device:
        raise ValueError("x and y must be on the weights' device")
