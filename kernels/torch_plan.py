"""How the torch path runs one step's segments: long ones one at a time, short ones as one padded batch.

The segment loop pays a fixed cost per segment (Python, two small matmuls) but no padding; the batched path pays
a fixed cost once plus every padded row: its groups are padded to the longest segment it takes. The plan sends
the longest segments to the loop as long as that lowers the estimated cost (in units of one padded row):
    loop:    SEGMENT_COST per contiguous segment (twice that for a gathered one) + its rows
    batched: BATCHED_COST + groups * longest length
Decode steps with many adapters batch everything; a prefill chunk among decode tokens goes to the loop; one or
a few segments (one adapter, prefill) loop.

The batched groups are the slot buffers themselves read as views when the step's slots lie close together
(every slot of the range lo..hi-1 is a group, those without tokens too: their rows are all padding), otherwise
the used slots' weights are gathered (copied) by index. Views read each used slot's weights once and copy
nothing; a gap costs one unused slot's read, a gather copies each used slot's weights (read, write, read again).
"""

from __future__ import annotations

from itertools import accumulate
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from .metadata import Segment

# The cost model's constants, fitted to the timings of each strategy forced (loadtest/RESULTS.md, "The CPU kernels'
# design figures"): a looped segment costs as much as SEGMENT_COST padded rows, the batched path BATCHED_COST plus
# its padded rows.
SEGMENT_COST = 16  # padded rows
BATCHED_COST = 72  # padded rows
# Views while the slot range holds at most VIEW_MAX_SPAN slots per used one: reading an unused slot costs less than
# gathering (copying) the used ones, up to about one unused slot per used one.
VIEW_MAX_SPAN = 2


class PaddedSegments(NamedTuple):
    """Segments laid out for one batched matmul pair: group g holds up to L tokens of one slot, padded."""

    slots: slice | torch.Tensor  # the groups' slots: slice(lo, hi) (views of the buffers) or [G] int64 (gather)
    used_slots: tuple[int, ...]  # host: the slots that have tokens here, ascending
    rows: torch.Tensor  # [G, L] int64: token row of each group position; padding points at row 0
    tokens: torch.Tensor  # [N] int64: rows of the real positions, in the order of `picks`
    picks: torch.Tensor | None  # [N] int64: positions of the real tokens in rows.view(-1); None: no padding


class TorchPlan(NamedTuple):
    """The segments run one at a time, and the rest as one padded batch (None: none left)."""

    loop: tuple[Segment, ...]
    batched: PaddedSegments | None

    @property
    def slots(self) -> frozenset[int]:
        """The slots whose segments the plan runs."""
        batched = self.batched.used_slots if self.batched is not None else ()
        return frozenset(segment.slot for segment in self.loop).union(batched)


def plan_segments(
    segments: tuple[Segment, ...], order: list[int], device: torch.device, strategy: str | None = None
) -> TorchPlan:
    """Split `segments` between the loop and the batched path; strategy 'loop' or 'batched' forces one for all.

    order: [T] the metadata's token order on the host (`LoraMeta.order`); device: where the index tensors go.
    """
    if strategy not in (None, "loop", "batched"):
        raise ValueError(f"strategy must be 'loop', 'batched' or None, got {strategy!r}")
    by_length = sorted(segments, key=lambda segment: segment.length, reverse=True)
    num_looped = {"loop": len(by_length), "batched": 0, None: _cheapest_split(by_length)}[strategy]
    looped, batched = by_length[:num_looped], by_length[num_looped:]
    if not batched:
        return TorchPlan(tuple(sorted(looped, key=lambda segment: segment.slot)), None)
    padded = _pad(sorted(batched, key=lambda segment: segment.slot), order, device)
    return TorchPlan(tuple(sorted(looped, key=lambda segment: segment.slot)), padded)


def _cheapest_split(by_length: list[Segment]) -> int:
    """How many of the longest segments (sorted by length, descending) to loop over, for the least cost."""
    n = len(by_length)
    slots = [segment.slot for segment in reversed(by_length)]
    lowest = list(accumulate(slots, min))[::-1]  # lowest[i]: the lowest slot of by_length[i:]
    highest = list(accumulate(slots, max))[::-1]
    best_cost, best, loop_cost = float("inf"), 0, 0
    for looped in range(n + 1):
        rest = n - looped
        if rest:
            groups = _num_groups(rest, highest[looped] + 1 - lowest[looped])
            cost = loop_cost + BATCHED_COST + groups * by_length[looped].length
        else:
            cost = loop_cost
        if cost < best_cost:
            best_cost, best = cost, looped
        if rest:
            segment = by_length[looped]
            loop_cost += SEGMENT_COST * (1 if segment.first_row >= 0 else 2) + segment.length
    return best


def _num_groups(used: int, span: int) -> int:
    """Groups of a batch of `used` slots lying in a range of `span` slots: the whole range (views) if dense enough."""
    return span if span <= VIEW_MAX_SPAN * used else used


def _pad(segments: list[Segment], order: list[int], device: torch.device) -> PaddedSegments:
    """The padded layout of `segments` (ascending slots): views over their slot range when dense enough.

    Built with host lists: at decode sizes that is several times faster than a dozen tiny tensor ops.
    """
    used = tuple(segment.slot for segment in segments)
    lo, hi = used[0], used[-1] + 1
    num_groups = _num_groups(len(used), hi - lo)
    as_views = num_groups == hi - lo  # every slot of the range is a group
    width = max(segment.length for segment in segments)  # L
    rows = [0] * (num_groups * width)  # [G * L]: padding points at row 0
    picks: list[int] = []  # [N]
    for index, segment in enumerate(segments):
        first = (segment.slot - lo if as_views else index) * width
        rows[first : first + segment.length] = order[segment.start : segment.start + segment.length]
        picks.extend(range(first, first + segment.length))
    tokens = [rows[pick] for pick in picks]  # [N]
    return PaddedSegments(
        slice(lo, hi) if as_views else torch.tensor(used, device=device),
        used,
        torch.tensor(rows, device=device).view(-1, width),
        torch.tensor(tokens, device=device),
        None if len(picks) == len(rows) else torch.tensor(picks, device=device),
    )
