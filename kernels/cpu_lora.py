"""The LoRA backend of the CPU: the compiled kernel (`cpu_lora.cpp`), one call for all of a step's segments.

The torch path pays a fixed cost per op and per group of tokens (index_select, two bmm, index_add_) that dwarfs
the arithmetic of a decode step; the kernel walks the step's segments in one call. Segments of at least
LONG_SEGMENT tokens (prefill chunks) go through torch's BLAS, one matmul pair each, where BLAS is the faster.

A LoRA layer (`linear`), or a group of them reading one x (`linear_group`: a decoder layer's q, k and v), is one
call, `lora_linear`: the base GEMMs (in chunks where a base is a chunked `PackedLinear`) and the kernel's tiles run
by the calling thread and a helper thread together, so the adapter weights stream in from memory during the GEMMs.
It applies to `nn.Linear` and `PackedLinear` bases of the adapters' dtype; others run the base, then the kernel.

The kernel takes float32 or bfloat16 (x, weights and y of one dtype) and sums in float32. It is one of the compiled
CPU ops (`cpu_build`), built on first use. When they cannot be built, or the operands do not suit the kernel (another
dtype, or another memory layout), the torch path serves instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .backend import LoraBackend
from .cpu_build import HELPER_ENV, cpu_ops
from .metadata import LoraMeta
from .operands import LoraOperands
from .packed_linear import PackedLinear
from .torch_lora import TorchBackend, run_plan
from .torch_plan import TorchPlan, plan_segments

# Segments from this many tokens up go through torch's BLAS (loadtest/RESULTS.md: the crossover, 128-256 tokens).
LONG_SEGMENT = 192


class CpuBackend(LoraBackend):
    """The compiled kernel; the torch path where it cannot serve."""

    name = "cpp"

    def __init__(self):
        self._torch = TorchBackend()
        self.overlap = os.environ.get(HELPER_ENV, "on") != "off"  # the kernel alongside the GEMM, with a helper thread
        self._long: tuple[LoraMeta, int, TorchPlan | None] | None = None  # (meta, its step, the long segments' plan)

    def prepare(self) -> None:
        cpu_ops()

    def slot_buffers(
        self, num_slots: int, max_rank: int, in_features: int, out_features: int, dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot-major, A stored [S, R, in] and B [S, R, out]: the weights a slot's tokens read are one contiguous
        block each (loadtest/RESULTS.md: faster than rank-outermost for the CPU kernel)."""
        A = torch.zeros(num_slots, max_rank, in_features, dtype=dtype, device=device)  # [S, R, in]
        B = torch.zeros(num_slots, max_rank, out_features, dtype=dtype, device=device).transpose(1, 2)  # [S, out, R]
        return A, B

    def linear(self, base: torch.nn.Module, x: torch.Tensor, ops: LoraOperands, meta: LoraMeta) -> torch.Tensor:
        return self.linear_group([base], x, [ops], meta)[0]

    def linear_group(self, bases: Sequence[torch.nn.Module], x: torch.Tensor, operands: Sequence[LoraOperands],
                     meta: LoraMeta) -> list[torch.Tensor]:
        """One `lora_linear` call for the group: every base GEMM chunk and LoRA tile one job shared with the helper."""
        compiled = cpu_ops()
        x_2d = x.reshape(-1, x.shape[-1])  # [T, in]
        weights = [_base_weights(base) for base in bases]  # each [out, in] in chunks of its rows, plain or packed
        if (
            compiled is None
            or not self.overlap
            or not _kernel_reads_all(weights, operands, x_2d)
        ):
            return [LoraBackend.linear(self, base, x, ops, meta) for base, ops in zip(bases, operands)]
        affines = [ops.affine or (None, None, None) for ops in operands]
        ys = compiled.lora_linear(
            x_2d, weights, [base.bias for base in bases], [ops.A for ops in operands], [ops.B for ops in operands],
            [ops.scales for ops in operands], [ops.ranks for ops in operands], meta.sorted_tokens, meta.segment_slots,
            meta.segment_starts, meta.segment_lengths, len(meta.segments), LONG_SEGMENT, *map(list, zip(*affines)),
        )  # each [T, out]
        for y, ops in zip(ys, operands):
            self._add_long_segments(y, x_2d, ops, meta)
        return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]

    def _add(self, y: torch.Tensor, x: torch.Tensor, ops: LoraOperands, meta: LoraMeta) -> None:
        compiled = cpu_ops()
        if compiled is None or not _kernel_reads(ops, x) or y.stride(1) != 1:
            self._torch._add(y, x, ops, meta)
            return
        compiled.lora_apply(y, x, *_kernel_operands(ops, meta))
        self._add_long_segments(y, x, ops, meta)

    def _add_long_segments(self, y: torch.Tensor, x: torch.Tensor, ops: LoraOperands, meta: LoraMeta) -> None:
        """The segments the kernel left to BLAS: one matmul pair each."""
        if self._long is None or self._long[0] is not meta or self._long[1] != meta.step:
            long = tuple(segment for segment in meta.segments if segment.length >= LONG_SEGMENT)
            self._long = (meta, meta.step, plan_segments(long, meta.order, x.device, "loop") if long else None)
        if self._long[2] is not None:
            run_plan(y, x, ops, self._long[2], meta)


def _base_weights(base: torch.nn.Module) -> list[torch.Tensor] | None:
    """The weight `lora_linear` multiplies by, in chunks of its output rows, for the bases it runs itself (a plain
    linear, or one packed for oneDNN); None for any other (a quantized linear runs its own forward)."""
    if type(base) is PackedLinear:
        return base.packed
    if type(base) is torch.nn.Linear:
        return [base.weight]
    return None


def _kernel_reads_all(weights: list[list[torch.Tensor] | None], operands: Sequence[LoraOperands],
                      x: torch.Tensor) -> bool:
    """Whether `lora_linear` takes every layer of the group: a base it runs itself in the adapters' dtype, and
    operands the kernel reads."""
    return all(
        w is not None and w[0].dtype == ops.A.dtype and _kernel_reads(ops, x) for w, ops in zip(weights, operands)
    )


def _kernel_reads(ops: LoraOperands, x: torch.Tensor) -> bool:
    """Whether the kernel takes these operands: weights of a kernel dtype in its layout, x of the weights' dtype with
    unit column stride."""
    return ops.cpu_kernel_layout and x.dtype == ops.A.dtype and x.stride(1) == 1


def _kernel_operands(ops: LoraOperands, meta: LoraMeta) -> tuple:
    """The kernel's arguments after x / y: the weights, the step's segments, the BLAS threshold, and the output
    affine's scale, shift and mapped (None for each without one)."""
    return (
        ops.A, ops.B, ops.scales, ops.ranks,
        meta.sorted_tokens, meta.segment_slots, meta.segment_starts, meta.segment_lengths, len(meta.segments),
        LONG_SEGMENT, *(ops.affine or (None, None, None)),
    )  # fmt: skip
