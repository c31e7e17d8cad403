"""The gathered-LoRA op in torch: the backend for devices without a kernel, and the CPU kernel's fallback.

Tokens come grouped by slot (the step's metadata), so each slot's weights are read once and, for the common
case, never copied. The step's plan (`torch_plan`) sends long segments through a loop of two matmuls each (on
row views when the segment's rows are contiguous) and the rest through one padded bmm pair over the slot
buffers read as views.

Weights beyond a slot's rank are never used: the batched path reads each group's weights up to the largest
rank among the slots it serves; when those ranks differ (or some are 0: the adapter does not target this
module), the shrunk activations and a copy of B are masked by rank, so stale or non-finite values beyond a
rank never reach y. Padding rows are computed, then dropped before the add. Ranks and scales are read on the
host: meant for the CPU (on CUDA it works, with a sync per layer).

The output affine (DoRA, lora_bias) maps its slots' rows once their deltas are in, one segment at a time: a few
small ops per mapped segment, none for plain LoRA slots.
"""

from __future__ import annotations

import torch

from .backend import LoraBackend
from .metadata import LoraMeta, Segment
from .operands import LoraOperands, OutputAffine
from .torch_plan import PaddedSegments, TorchPlan, plan_segments


class TorchBackend(LoraBackend):
    """The torch path: the step's plan, made once per step and shared by every layer."""

    name = "torch"

    def __init__(self):
        self._plan: tuple[LoraMeta, int, TorchPlan] | None = None  # (meta, its step, the plan)

    def _add(self, y: torch.Tensor, x: torch.Tensor, ops: LoraOperands, meta: LoraMeta) -> None:
        if self._plan is None or self._plan[0] is not meta or self._plan[1] != meta.step:
            self._plan = (meta, meta.step, plan_segments(meta.segments, meta.order, x.device))
        run_plan(y, x, ops, self._plan[2], meta)


def run_plan(y: torch.Tensor, x: torch.Tensor, ops: LoraOperands, plan: TorchPlan, meta: LoraMeta) -> None:
    """y += LoRA(x) for the plan's segments. y: [T, out] (may be strided); x: [T, in]; ops match x and y."""
    host_ranks, host_scales = ops.ranks.tolist(), ops.scales.tolist()  # [S]
    if plan.loop:
        _segment_loop(y, x, ops.A, ops.B, host_scales, host_ranks, plan.loop, meta.sorted_tokens)
    if plan.batched is not None:
        _padded_bmm(y, x, ops.A, ops.B, ops.scales, ops.ranks, host_scales, host_ranks, plan.batched)
    if ops.affine is not None:
        _map_rows(y, ops.affine, plan, meta)


def _map_rows(y: torch.Tensor, affine: OutputAffine, plan: TorchPlan, meta: LoraMeta) -> None:
    """y[t] = scale[s] * y[t] + shift[s] for the tokens of the plan's segments whose slot s the affine maps, in
    float32, rounded once into y. y: [T, out] (may be strided)."""
    mapped, planned = affine.mapped.tolist(), plan.slots  # [S] host
    for segment in meta.segments:
        if not mapped[segment.slot] or segment.slot not in planned:
            continue
        scale, shift = affine.scale[segment.slot], affine.shift[segment.slot]  # [out] float32
        if segment.first_row >= 0:  # a contiguous run of rows: in place on the view
            rows = y[segment.first_row : segment.first_row + segment.length]  # [n, out]
            rows.copy_(rows.float() * scale + shift)
        else:
            index = meta.sorted_tokens[segment.start : segment.start + segment.length].long()  # [n]
            y.index_copy_(0, index, (y.index_select(0, index).float() * scale + shift).to(y.dtype))


def _segment_loop(
    y: torch.Tensor,  # [T, out]
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [S, R, in]
    B: torch.Tensor,  # [S, out, R]
    scales: list[float],  # [S]
    ranks: list[int],  # [S]
    segments: tuple[Segment, ...],
    sorted_tokens: torch.Tensor,  # [T] int32
) -> None:
    """y += scale * x A[:r]^T B[:, :r]^T, one segment at a time, reading only each slot's real rank."""
    for segment in segments:
        rank = ranks[segment.slot]
        if rank == 0:
            continue
        a = A[segment.slot, :rank]  # [r, in]
        b = B[segment.slot, :, :rank]  # [out, r]
        scale = scales[segment.slot]
        if segment.first_row >= 0:  # the segment's tokens are a contiguous run of rows: work on views
            rows = slice(segment.first_row, segment.first_row + segment.length)
            y[rows].addmm_(x[rows] @ a.T, b.T, alpha=scale)
        else:
            index = sorted_tokens[segment.start : segment.start + segment.length]  # [n]
            shrunk = x.index_select(0, index) @ a.T  # [n, r]
            y.index_add_(0, index, shrunk @ b.T, alpha=scale)


def _padded_bmm(
    y: torch.Tensor,  # [T, out]
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [S, R, in]
    B: torch.Tensor,  # [S, out, R]
    scales: torch.Tensor,  # [S] float32
    ranks: torch.Tensor,  # [S] int32
    host_scales: list[float],  # [S]
    host_ranks: list[int],  # [S]
    padded: PaddedSegments,
) -> None:
    """y += ..., all of `padded`'s segments at once: two bmm over the groups' weights up to the largest rank."""
    used_ranks = {host_ranks[slot] for slot in padded.used_slots}
    rank = max(used_ranks)
    if rank == 0:
        return
    slots = padded.slots  # slice(lo, hi): views of the slot buffers; else [G] indices: gather (copy)
    a = A[slots, :rank] if isinstance(slots, slice) else A[:, :rank].index_select(0, slots)  # [G, r, in]
    b = B[slots, :, :rank] if isinstance(slots, slice) else B[:, :, :rank].index_select(0, slots)  # [G, out, r]
    G, L = padded.rows.shape
    shrunk = torch.bmm(x.index_select(0, padded.rows.view(-1)).view(G, L, -1), a.transpose(1, 2))  # [G, L, r]
    if len(used_ranks) > 1:  # mixed ranks: mask what lies beyond each slot's own rank
        group_ranks = ranks[slots] if isinstance(slots, slice) else ranks.index_select(0, slots)  # [G]
        within_rank = torch.arange(rank, device=x.device) < group_ranks[:, None]  # [G, r]
        shrunk = torch.where(within_rank[:, None, :], shrunk, 0)
        b = torch.where(within_rank[:, None, :], b, 0)  # [G, out, r], a copy
    used_scales = {host_scales[slot] for slot in padded.used_slots}
    if len(used_scales) == 1:  # one scale for every group: it rides on the final add
        alpha = used_scales.pop()
    else:
        alpha = 1.0
        group_scales = scales[slots] if isinstance(slots, slice) else scales.index_select(0, slots)  # [G]
        shrunk = shrunk * group_scales[:, None, None].to(shrunk.dtype)  # [G, L, r]
    delta = torch.bmm(shrunk, b.transpose(1, 2)).view(G * L, -1)  # [G * L, out]
    if padded.picks is not None:  # drop the padding rows (their values may be anything)
        delta = delta.index_select(0, padded.picks)  # [N, out]
    y.index_add_(0, padded.tokens, delta, alpha=alpha)
