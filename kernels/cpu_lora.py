"""The gathered-LoRA op as a compiled CPU kernel (`cpu_lora.cpp`): the engine's LoRA path on the CPU.

The torch path (`torch_lora`) pays a fixed cost per op and per group of tokens (index_select, two bmm,
index_add_) that dwarfs the arithmetic of a decode step; the kernel walks the step's segments in one call.
Demo model, decode step of 32 tokens over 8 rank-16 adapters, all 28 LoRA layers, warm caches, 1 thread, 2-core
AMD EPYC: 0.43-0.6 ms against 1.5-2.0 ms for the torch path (loadtest/RESULTS.md has the cold-cache figures).

`lora_linear_cpu` is a whole LoRA layer in one call: the base GEMM on the calling thread while a helper thread
runs the kernel, so the adapter weights stream in from memory during the GEMM (loadtest/RESULTS.md: adapters/base
over HTTP 0.98 median against 0.87 with the kernel after each GEMM).

It is one of the compiled CPU ops (`cpu_build`), built on first use. When they cannot be built, or the operands
do not suit the kernel (not float32, or another memory layout), the torch path serves instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from .cpu_build import cpu_ops
from .operands import LoraOperands
from .torch_lora import lora_torch

if TYPE_CHECKING:
    from .metadata import LoraBatchMeta, Segment

# Segments from this many tokens up (long prefill chunks) go through torch's BLAS, one matmul pair each: all 28
# LoRA layers of the demo model, 8 segments of n tokens, rank 16, 1 thread: n = 128: kernel 18.0 ms, BLAS 23.5;
# 192: 27.1 and 28.0; 256: 37.5 and 34.3 (2-core AMD EPYC VM).
LONG_SEGMENT = 192


def lora_cpu(y: torch.Tensor, x: torch.Tensor, ops: LoraOperands, meta: LoraBatchMeta) -> None:
    """y += scale * x A^T B^T per token's slot, through the kernel when it is built and suits the operands.

    y: [T, out_total] (rows may be strided); x: [T, in]; ops, meta: as for `lora_torch` (CPU tensors).
    The kernel takes float32 weights laid out with A's in and B's out innermost (`ops.cpu_kernel_layout`) and
    x, y with unit column stride; anything else goes to the torch path.
    """
    compiled = cpu_ops()
    if compiled is None or not ops.cpu_kernel_layout or x.stride(1) != 1 or y.stride(1) != 1:
        lora_torch(y, x, ops, meta)
        return
    plan = meta.cpu_plan
    if plan.long:  # prefill-sized segments: one matmul pair each through torch's BLAS
        lora_torch(y, x, ops, meta, strategy="loop", segments=plan.long)
    if plan.num_short:
        compiled.lora_apply(
            y, x, ops.A, ops.B, ops.scales, ops.ranks, meta.sorted_tokens, plan.slots, plan.starts, plan.lengths,
            plan.num_short, ops.offsets, ops.sizes,
        )


def lora_linear_cpu(
    base: torch.nn.Module, x: torch.Tensor, ops: LoraOperands, meta: LoraBatchMeta
) -> torch.Tensor | None:
    """base(x) + the LoRA deltas [T, out], the kernel running on a helper thread during the base GEMM; None when
    this path does not apply (no compiled ops, a base other than a float32 `nn.Linear`, other operands).

    x: [T, in] float32 with unit column stride; ops, meta: as for `lora_cpu`.
    """
    compiled = cpu_ops()
    if (
        compiled is None
        or type(base) is not torch.nn.Linear
        or base.weight.dtype != torch.float32
        or x.dtype != torch.float32
        or not ops.cpu_kernel_layout
        or x.stride(1) != 1
    ):
        return None
    plan = meta.cpu_plan
    y = compiled.lora_linear(
        x, base.weight, base.bias, ops.A, ops.B, ops.scales, ops.ranks, meta.sorted_tokens, plan.slots, plan.starts,
        plan.lengths, plan.num_short, ops.offsets, ops.sizes,
    )
    if plan.long:  # prefill-sized segments: one matmul pair each through torch's BLAS
        lora_torch(y, x, ops, meta, strategy="loop", segments=plan.long)
    return y


class CpuPlan(NamedTuple):
    """A step's segments split between torch's BLAS (long ones) and the kernel (the rest, as its arrays)."""

    long: tuple[Segment, ...]  # segments of at least LONG_SEGMENT tokens
    slots: torch.Tensor  # [num_short] int32: the kernel's segments (all the others)
    starts: torch.Tensor  # [num_short] int32
    lengths: torch.Tensor  # [num_short] int32
    num_short: int


def plan_cpu(segments: tuple[Segment, ...]) -> CpuPlan:
    """Split a step's segments (`meta.cpu_plan` calls this once per step)."""
    long = tuple(segment for segment in segments if segment.length >= LONG_SEGMENT)
    short = [segment for segment in segments if segment.length < LONG_SEGMENT]
    columns = torch.tensor([[s.slot, s.start, s.length] for s in short], dtype=torch.int32).view(-1, 3)
    return CpuPlan(long, *columns.T.contiguous(), len(short))  # [3, num_short]: one contiguous row per field
