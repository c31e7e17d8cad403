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

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from .metadata import Segment

# From `python -m loradock.loadtest.kernel_bench` and each strategy forced on mixed steps, demo-model layer shapes
# (fp32, 2-core AMD EPYC, torch 2.13): a contiguous one-token segment of the loop costs ~9 us, the batched path
# ~70 us fixed (index_select of x, two bmm, index_add_) plus ~0.5 us per padded row.
SEGMENT_COST = 16  # padded rows
BATCHED_COST = 128  # padded rows
VIEW_MAX_SPAN = 2  # read the slot range as views while it holds at most this many slots per used slot


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


def plan_segments(
    segments: tuple[Segment, ...], sorted_tokens: torch.Tensor, device: torch.device, strategy: str | None = None
) -> TorchPlan:
    """Split `segments` between the loop and the batched path; strategy 'loop' or 'batched' forces one for all.

    sorted_tokens: [T] int32, the metadata's token order (read on the host); device: where the index tensors go.
    """
    if strategy not in (None, "loop", "batched"):
        raise ValueError(f"strategy must be 'loop', 'batched' or None, got {strategy!r}")
    by_length = sorted(segments, key=lambda segment: segment.length, reverse=True)
    num_looped = {"loop": len(by_length), "batched": 0, None: _cheapest_split(by_length)}[strategy]
    looped, batched = by_length[:num_looped], by_length[num_looped:]
    if not batched:
        return TorchPlan(tuple(sorted(looped, key=lambda segment: segment.slot)), None)
    padded = _pad(sorted(batched, key=lambda segment: segment.slot), sorted_tokens, device)
    return TorchPlan(tuple(sorted(looped, key=lambda segment: segment.slot)), padded)


def _cheapest_split(by_length: list[Segment]) -> int:
    """How many of the longest segments (sorted by length, descending) to loop over, for the least cost."""
    best_cost, best, loop_cost = float("inf"), 0, 0
    for looped in range(len(by_length) + 1):
        rest = len(by_length) - looped
        cost = loop_cost + (BATCHED_COST + rest * by_length[looped].length if rest else 0)
        if cost < best_cost:
            best_cost, best = cost, looped
        if rest:
            segment = by_length[looped]
            loop_cost += SEGMENT_COST * (1 if segment.first_row >= 0 else 2) + segment.length
    return best


def _pad(segments: list[Segment], sorted_tokens: torch.Tensor, device: torch.device) -> PaddedSegments:
    """The padded layout of `segments` (ascending slots): views over their slot range when dense enough.

    Built with host lists: at decode sizes that is several times faster than a dozen tiny tensor ops.
    """
    used = tuple(segment.slot for segment in segments)
    lo, hi = used[0], used[-1] + 1
    as_views = hi - lo <= VIEW_MAX_SPAN * len(used)
    width = max(segment.length for segment in segments)  # L
    order = sorted_tokens.tolist()  # [T]
    rows = [0] * ((hi - lo if as_views else len(used)) * width)  # [G * L]: padding points at row 0
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
