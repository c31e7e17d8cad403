"""Shape checks of the LoRA op's operands, done once for the weights and per call for the activations.

The weights are checked when their operands are made (a LoRA layer does it at construction); each call then checks
only its activations x and y against them.

A layer's operands may carry an `OutputAffine`: per-slot vectors that map the output rows of DoRA and lora_bias
slots after the delta is added, y[t] <- scale[s] * (y[t] + delta[t]) + shift[s]. Slots not marked `mapped` (plain
LoRA) never read them, so their rows are computed exactly as without it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .cpu_build import KERNEL_DTYPES


class OutputAffine(NamedTuple):
    """Per-slot affine map of a LoRA layer's output rows: y[t] <- scale[s] * (y[t] + delta[t]) + shift[s] for the
    tokens t of a slot s marked `mapped`. DoRA: scale = m / ||W + s·BA|| per output, shift = (1 - scale) * the base's
    bias; lora_bias: scale = 1, shift = s * lora_B's bias (`adapters/lora_layer.py` fills them)."""

    scale: torch.Tensor  # [S, out] float32, contiguous; read only for mapped slots
    shift: torch.Tensor  # [S, out] float32, contiguous; read only for mapped slots
    mapped: torch.Tensor  # [S] int32: 1 where the slot's rows are mapped, 0 for plain LoRA


class LoraOperands(NamedTuple):
    """A LoRA layer's slot buffers, checked, and whether the compiled CPU kernel can read them."""

    A: torch.Tensor  # [S, R, in]: shrink weights per slot, zero- (or garbage-) padded beyond rank
    B: torch.Tensor  # [S, out, R]: expand weights per slot; any strides
    scales: torch.Tensor  # [S] float32
    ranks: torch.Tensor  # [S] int32: real rank per slot, <= R
    cpu_kernel_layout: bool  # float32 or bfloat16 CPU weights, A's in and B's out innermost: the CPU kernel reads them
    affine: OutputAffine | None = None  # None: every slot is plain LoRA


def lora_operands(
    A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor, affine: OutputAffine | None = None
) -> LoraOperands:
    """Check the weights' shapes, dtypes and devices. A: [S, R, in]; B: [S, out, R]; scales, ranks: [S]; affine:
    scale and shift [S, out], mapped [S]."""
    if A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"expected A [S,R,in] and B [S,out,R]; got A {tuple(A.shape)}, B {tuple(B.shape)}")
    S, R, _ = A.shape
    if B.shape[0] != S or B.shape[2] != R or scales.shape != (S,) or ranks.shape != (S,):
        raise ValueError(
            f"inconsistent LoRA operands: A {tuple(A.shape)}, B {tuple(B.shape)}, scales {tuple(scales.shape)}, "
            f"ranks {tuple(ranks.shape)}"
        )
    if A.dtype != B.dtype:
        raise TypeError(f"A and B must share one dtype, got {A.dtype} and {B.dtype}")
    if scales.dtype != torch.float32 or ranks.dtype != torch.int32:
        raise TypeError(f"scales must be float32 and ranks int32, got {scales.dtype} and {ranks.dtype}")
    if not scales.is_contiguous() or not ranks.is_contiguous():
        raise ValueError("scales and ranks must be contiguous")
    if len({t.device for t in (A, B, scales, ranks)}) != 1:
        raise ValueError("all LoRA operands must be on one device")
    if affine is not None:
        _check_affine(affine, S, B.shape[1], A.device)
    cpu_kernel_layout = A.device.type == "cpu" and A.dtype in KERNEL_DTYPES and A.stride(2) == 1 and B.stride(1) == 1
    return LoraOperands(A, B, scales, ranks, cpu_kernel_layout, affine)


def _check_affine(affine: OutputAffine, num_slots: int, out_features: int, device: torch.device) -> None:
    shapes = (tuple(affine.scale.shape), tuple(affine.shift.shape), tuple(affine.mapped.shape))
    if shapes != ((num_slots, out_features), (num_slots, out_features), (num_slots,)):
        raise ValueError(
            f"expected the output affine's scale and shift [{num_slots}, {out_features}] and mapped [{num_slots}]; got "
            f"{', '.join(map(str, shapes))}"
        )
    if affine.scale.dtype != torch.float32 or affine.shift.dtype != torch.float32 or affine.mapped.dtype != torch.int32:
        raise TypeError("the output affine's scale and shift must be float32 and mapped int32")
    if not all(t.is_contiguous() for t in affine):
        raise ValueError("the output affine's tensors must be contiguous")
    if any(t.device != device for t in affine):
        raise ValueError("the output affine must be on the weights' device")


def check_activations(y: torch.Tensor, x: torch.Tensor, ops: LoraOperands) -> None:
    """Check x [T, in] and y [T, out] against the operands: shapes, dtype (the weights'), device."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != ops.A.shape[2] or y.shape != (x.shape[0], ops.B.shape[1]):
        raise ValueError(
            f"expected x [T, {ops.A.shape[2]}] and y [T, {ops.B.shape[1]}]; got x {tuple(x.shape)}, y {tuple(y.shape)}"
        )
    if x.dtype != ops.A.dtype or y.dtype != ops.A.dtype:
        raise TypeError(f"x and y must have the weights' dtype {ops.A.dtype}, got {x.dtype} and {y.dtype}")
    if x.device != ops.A.device or y.device != ops.A.device:
        raise ValueError("x and y must be on the weights' device")
