"""Per-step LoRA batch metadata: which tokens use which adapter slot, grouped by slot.

Built once per engine step by `build_lora_meta` and read by every LoRA layer of that step. Tokens are grouped
by slot through an index (`sorted_tokens`); x and y are never permuted. A *segment* is the run of entries of
`sorted_tokens` that share one slot. Prefill chunks (long segments) and decode tokens (segments of one token,
or one long segment when every request uses the same adapter) share this one format.

The device tensors have static shapes (T tokens, `max_slots` segments, padded), so Triton grids are sized
from static maxima and kernels exit early on padded segments: a captured CUDA graph stays valid when the
mix of adapters changes. The host copies (`segments`) serve the torch path without device->host syncs; its
plan (`torch_plan`) is built on first use and shared by every layer of the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

import torch

from .backend import lora_backend
from .torch_plan import TorchPlan, plan_segments

if TYPE_CHECKING:
    from .cpu_lora import CpuPlan


class Segment(NamedTuple):
    """One run of tokens sharing an adapter slot, on the host."""

    slot: int  # adapter slot index, >= 0
    start: int  # offset of the run in `sorted_tokens`
    length: int  # number of tokens in the run, >= 1
    first_row: int  # when the run's tokens are the rows first_row .. first_row+length-1 of x: first_row; else -1


@dataclass(frozen=True, eq=False)
class LoraBatchMeta:
    """Token -> slot grouping of one step; device tensors padded to static maxima, plus host copies."""

    token_slots: torch.Tensor  # [T] int32: slot per token, -1 = base model only
    sorted_tokens: torch.Tensor  # [T] int32: token indices grouped by slot (ascending), base tokens last
    segment_slots: torch.Tensor  # [max_slots] int32: slot of each segment, -1 padding
    segment_starts: torch.Tensor  # [max_slots] int32: offset of each segment in sorted_tokens, 0 padding
    segment_lengths: torch.Tensor  # [max_slots] int32: tokens per segment, 0 padding
    num_segments: torch.Tensor  # [1] int32: real segments (the rest of the segment arrays is padding)
    max_segment_length: torch.Tensor  # [1] int32: longest real segment
    max_slots: int  # S: the static number of segments the device arrays hold
    segments: tuple[Segment, ...]  # host copy of the real segments, in slot order
    backend: str  # the LoRA backend of this step's device ('triton', 'cpp' or 'torch'), chosen once per step

    @property
    def num_tokens(self) -> int:
        """T: tokens in the step, adapter and base ones."""
        return self.token_slots.shape[0]

    @property
    def num_lora_tokens(self) -> int:
        """Tokens that use an adapter."""
        return sum(segment.length for segment in self.segments)

    @cached_property
    def cpu_plan(self) -> CpuPlan:
        """How the CPU path splits this step's segments between BLAS and the kernel (`cpu_lora.plan_cpu`)."""
        from .cpu_lora import plan_cpu

        return plan_cpu(self.segments)

    @cached_property
    def torch_plan(self) -> TorchPlan:
        """How the torch path runs this step's segments (`torch_plan.plan_segments`)."""
        return plan_segments(self.segments, self.sorted_tokens, self.token_slots.device)


def build_lora_meta(
    token_slots: torch.Tensor | list[int], max_slots: int, device: torch.device | str | None = None
) -> LoraBatchMeta | None:
    """Group a step's tokens by adapter slot; None when no token uses an adapter (callers skip the op).

    token_slots: [T] integer slot per token, -1 for the base model, else in [0, max_slots): a host list or a
    tensor (a CUDA one costs a device->host sync). The grouping runs on the host in plain Python (a decode
    step's 32 tokens: about 25 us, where a dozen tiny tensor ops took 110); the result reaches `device`
    (default: token_slots' device, the CPU for a list) in one transfer.
    """
    if isinstance(token_slots, torch.Tensor):
        if token_slots.dim() != 1 or token_slots.dtype.is_floating_point or token_slots.dtype == torch.bool:
            raise ValueError(
                f"token_slots must be a 1-D integer tensor, got {token_slots.dtype} {list(token_slots.shape)}"
            )
        device = torch.device(device) if device is not None else token_slots.device
        slots = token_slots.tolist()
    else:
        device = torch.device(device) if device is not None else torch.device("cpu")
        slots = list(token_slots)
        if any(not isinstance(slot, int) or isinstance(slot, bool) for slot in slots):
            raise ValueError("token slots must be integers")
    if slots and (min(slots) < -1 or max(slots) >= max_slots):
        raise ValueError(f"token slots must lie in [-1, {max_slots}), got {min(slots)}..{max(slots)}")
    # base tokens sort last; the stable sort keeps each slot's tokens in their batch order
    order = sorted(range(len(slots)), key=lambda token: slots[token] if slots[token] >= 0 else max_slots)
    segments: list[Segment] = []
    start = 0
    while start < len(order) and slots[order[start]] >= 0:
        slot, end = slots[order[start]], start + 1
        while end < len(order) and slots[order[end]] == slot:
            end += 1
        first, last = order[start], order[end - 1]
        segments.append(Segment(slot, start, end - start, first if last - first == end - start - 1 else -1))
        start = end
    if not segments:
        return None

    # one host buffer, one copy to the device; the fields are views into it
    num_tokens, num_segments = len(slots), len(segments)
    padding = max_slots - num_segments
    packed = torch.tensor(
        slots
        + order
        + [segment.slot for segment in segments] + [-1] * padding
        + [segment.start for segment in segments] + [0] * padding
        + [segment.length for segment in segments] + [0] * padding
        + [num_segments, max(segment.length for segment in segments)],
        dtype=torch.int32,
    )
    if device.type == "cuda":
        packed = packed.pin_memory()
    field_sizes = [num_tokens, num_tokens, max_slots, max_slots, max_slots, 1, 1]
    on_device = packed.to(device, non_blocking=True).split(field_sizes)
    return LoraBatchMeta(*on_device, max_slots=max_slots, segments=tuple(segments), backend=lora_backend(device))
