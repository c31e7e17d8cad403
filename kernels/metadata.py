"""Per-step LoRA metadata: which tokens use which adapter slot, grouped by slot, in buffers allocated once.

Every LoRA layer of a step reads the same `LoraMeta`. Tokens are grouped by slot through an index
(`sorted_tokens`); x and y are never permuted. A *segment* is the run of entries of `sorted_tokens` that share one
slot. Prefill chunks (long segments) and decode tokens (segments of one token, or one long segment when every
request uses the same adapter) share this one format.

The device tensors are allocated once, sized from the engine's limits (`max_tokens` a step, `max_slots` device
slots), and rewritten in place from one host staging buffer by one copy a step (the metadata's own, or, inside a
caller's packed buffers, that of its own part or the caller's one copy of all its step inputs): every step reads
the same tensors, so the kernels' launch shapes depend only on the step's token count and `max_slots`, and a
captured CUDA graph stays valid when the mix of adapters changes. Padding segments have length 0 (kernels exit
early on them). The host copies (`segments`, `order`) serve the host-side plans of the CPU and torch paths without
device->host syncs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Segment(NamedTuple):
    """One run of tokens sharing an adapter slot, on the host."""

    slot: int  # adapter slot index, >= 0
    start: int  # offset of the run in `sorted_tokens`
    length: int  # number of tokens in the run, >= 1
    first_row: int  # when the run's tokens are the rows first_row .. first_row+length-1 of x: first_row; else -1


class LoraMeta:
    """Token -> slot grouping of the current step: device buffers of static size, rewritten by `update`."""

    def __init__(self, max_tokens: int, max_slots: int, device: torch.device | str,
                 storage: tuple[torch.Tensor, torch.Tensor] | None = None):
        """storage: (host, device) int32 tensors of `size(max_tokens, max_slots)` elements inside a caller's packed
        buffers: `write` fills the host part for the caller's one copy of all its inputs, `update` fills and copies
        this part alone. None: this object owns its buffers."""
        self.max_tokens, self.max_slots = max_tokens, max_slots
        self.device = torch.device(device)
        if storage is None:
            on_cuda = self.device.type == "cuda"
            host = torch.empty(self.size(max_tokens, max_slots), dtype=torch.int32, pin_memory=on_cuda)
            storage = (host, host.to(self.device) if on_cuda else host)  # the CPU reads the host buffer itself
        self._staging, packed = storage
        self._host = self._staging.numpy()  # the staging buffer as numpy: fast bulk writes from lists
        fields = packed.split([max_tokens, max_tokens, max_slots, max_slots, max_slots])
        self._packed = packed
        self.token_slots = fields[0]  # [max_tokens] int32: slot per token, -1 = base model; past T: stale
        self.sorted_tokens = fields[1]  # [max_tokens] int32: token indices grouped by slot, base last; past T: stale
        self.segment_slots = fields[2]  # [max_slots] int32: slot of each segment, -1 padding
        self.segment_starts = fields[3]  # [max_slots] int32: offset of each segment in sorted_tokens, 0 padding
        self.segment_lengths = fields[4]  # [max_slots] int32: tokens per segment, 0 padding
        self.num_tokens = 0  # T: tokens of the current step
        self.segments: tuple[Segment, ...] = ()  # host copy of the real segments, in slot order
        self.order: list[int] = []  # host copy of sorted_tokens[:T]
        self.step = 0  # bumped by every write: per-step plans of the backends are cached against it
        self._write([], [])

    @staticmethod
    def size(max_tokens: int, max_slots: int) -> int:
        """int32 elements of the packed buffer."""
        return 2 * max_tokens + 3 * max_slots

    @property
    def active(self) -> bool:
        """Whether any token of the current step uses an adapter."""
        return bool(self.segments)

    @property
    def num_lora_tokens(self) -> int:
        return sum(segment.length for segment in self.segments)

    def update(self, token_slots: Sequence[int]) -> bool:
        """Write a step's grouping and bring it to the device; returns `active`. token_slots: [T] slot per token,
        -1 = base model. One copy (non-blocking from pinned memory on CUDA: the previous step's copy has completed,
        since every step ends with the sampled tokens' transfer to the host)."""
        active = self.write(token_slots)
        if self._packed is not self._staging:
            self._packed.copy_(self._staging, non_blocking=True)
        return active

    def write(self, token_slots: Sequence[int]) -> bool:
        """Write a step's grouping into the host buffer only (the owner of shared storage copies it); returns
        `active`. The grouping runs on the host in plain Python: cheaper than a dozen tiny tensor ops at decode
        sizes."""
        slots = list(token_slots)
        if len(slots) > self.max_tokens:
            raise ValueError(f"a step of {len(slots)} tokens exceeds the metadata's {self.max_tokens}")
        if any(not isinstance(slot, int) or isinstance(slot, bool) for slot in slots):
            raise ValueError("token slots must be integers")
        if slots and (min(slots) < -1 or max(slots) >= self.max_slots):
            raise ValueError(f"token slots must lie in [-1, {self.max_slots}), got {min(slots)}..{max(slots)}")
        # base tokens sort last; the stable sort keeps each slot's tokens in their batch order
        order = sorted(range(len(slots)), key=lambda token: slots[token] if slots[token] >= 0 else self.max_slots)
        self.num_tokens, self.order, self.segments = len(slots), order, _segments(slots, order)
        self.step += 1
        self._write(slots, order)
        return self.active

    def _write(self, slots: list[int], order: list[int]) -> None:
        """Fill the staging buffer; tokens past T keep stale values: no segment points at them."""
        num_tokens, max_tokens, max_slots = len(slots), self.max_tokens, self.max_slots
        host = self._host
        host[:num_tokens] = slots
        host[max_tokens : max_tokens + num_tokens] = order
        segment_fields = host[2 * max_tokens :].reshape(3, max_slots)  # slots, starts, lengths
        segment_fields[0], segment_fields[1:] = -1, 0
        for index, segment in enumerate(self.segments):
            segment_fields[:, index] = segment.slot, segment.start, segment.length


def _segments(slots: list[int], order: list[int]) -> tuple[Segment, ...]:
    """The runs of `order` (token indices sorted by slot) that share a slot, base tokens (-1) excluded."""
    segments: list[Segment] = []
    start = 0
    while start < len(order) and slots[order[start]] >= 0:
        slot, end = slots[order[start]], start + 1
        while end < len(order) and slots[order[end]] == slot:
            end += 1
        first, last = order[start], order[end - 1]
        segments.append(Segment(slot, start, end - start, first if last - first == end - start - 1 else -1))
        start = end
    return tuple(segments)
