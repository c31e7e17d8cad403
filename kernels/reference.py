"""The gathered-LoRA op in plain torch: the readable oracle, and the fast path the engine uses on the CPU.

The op, per token t with slot s = token_slots[t] != -1 and for each slice i (columns off_i .. off_i+size_i):
    y[t, off_i:off_i+size_i] += scales[i, s] * (x[t] @ A[i, s, :r].T) @ B[s, off_i:off_i+size_i, :r].T
with r = ranks[i, s]. Weights beyond a slot's rank are never read: they may hold stale values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .metadata import LoraBatchMeta
from .operands import lora_operands

# Choosing between the two torch strategies, from `python -m loradock.loadtest.kernel_bench` (median ms, fp32,
# 2-core AMD EPYC, torch 2.13). The segment loop pays ~10 us of Python and dispatch per segment whose rows are
# contiguous (views, no copies) and ~20 us per gathered segment (index_select + index_add_); the padded bmm
# pays ~100 us fixed plus one weight copy per segment. T=32 decode, 256x256 R16: 32 adapters loop 0.298 vs
# batched 0.189, 8 adapters (gathered segments of 4 tokens) 0.155 vs 0.143, 1 adapter 0.028 vs 0.098.
# Where R*(in+out) reaches 60k the copies cost more than the loop saves: 256x688 R64, 32 adapters 0.454 vs
# 0.906; 4096x4096 R16, 32 adapters 0.866 vs 2.211. Prefill (few contiguous segments): the loop, always.
BATCHED_MIN_LOOP_COST = 12  # segments, a gathered one counting twice
BATCHED_MAX_WEIGHTS_PER_SEGMENT = 32_768  # R * (in + out) elements copied per segment


def lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
    slice_sizes: Sequence[int] | None = None,
) -> None:
    """The readable oracle: gather each token's own A and B, mask them by rank, two bmm in fp32; y += result.

    y: [T, out_total] (in place, may be strided); x: [T, in]; A: [S, R, in] or [n, S, R, in];
    B: [S, out_total, R]; scales: [S] or [n, S] float32; ranks: [S] or [n, S] int32; token_slots: [T] (-1 = none).
    """
    ops = lora_operands(y, x, A, B, scales, ranks, slice_sizes)
    tokens = (token_slots >= 0).nonzero().squeeze(1)  # [N]: the tokens that use an adapter
    slots = token_slots[tokens].long()  # [N]
    x_tokens = x[tokens].float()  # [N, in]
    rank_positions = torch.arange(ops.A.shape[2], device=x.device)  # [R]
    for i, (offset, size) in enumerate(zip(ops.offsets, ops.sizes)):
        within_rank = rank_positions < ops.ranks[i, slots, None]  # [N, R]
        a = torch.where(within_rank[:, :, None], ops.A[i, slots], 0).float()  # [N, R, in]
        b = torch.where(within_rank[:, None, :], ops.B[slots, offset : offset + size], 0).float()  # [N, size, R]
        shrunk = torch.bmm(a, x_tokens[:, :, None])  # [N, R, 1]
        delta = torch.bmm(b, shrunk).squeeze(2) * ops.scales[i, slots, None]  # [N, size]
        y[:, offset : offset + size].index_add_(0, tokens, delta.to(y.dtype))


def lora_torch(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    meta: LoraBatchMeta,
    slice_sizes: Sequence[int] | None = None,
    strategy: str | None = None,
) -> None:
    """The fast torch path: tokens grouped by slot, so each slot's weights are read once, never copied per token.

    Same operands as `lora_reference`, with the step's metadata instead of token_slots. Per slice it runs
    either a loop over segments (strategy 'loop': two mm each, on row views when the segment's rows are
    contiguous) or one segment-padded bmm pair (strategy 'batched'); None picks by size (`torch_strategy`).
    Reads ranks and scales on the host: meant for the CPU (on CUDA it works but syncs).
    """
    ops = lora_operands(y, x, A, B, scales, ranks, slice_sizes)
    _, _, R, in_features = ops.A.shape
    for i, (offset, size) in enumerate(zip(ops.offsets, ops.sizes)):
        chosen = strategy or torch_strategy(meta, R, in_features, size)
        run = {"loop": _segment_loop, "batched": _padded_bmm}[chosen]
        y_slice, B_slice = y[:, offset : offset + size], ops.B[:, offset : offset + size]  # [T, size], [S, size, R]
        run(y_slice, x, ops.A[i], B_slice, ops.scales[i], ops.ranks[i], meta)


def torch_strategy(meta: LoraBatchMeta, max_rank: int, in_features: int, out_features: int) -> str:
    """'batched' for small layers when the segment loop would pay much Python overhead, else 'loop'."""
    small = max_rank * (in_features + out_features) <= BATCHED_MAX_WEIGHTS_PER_SEGMENT
    loop_cost = sum(1 if segment.first_row >= 0 else 2 for segment in meta.segments)
    return "batched" if small and loop_cost >= BATCHED_MIN_LOOP_COST else "loop"


def _segment_loop(
    y: torch.Tensor,  # [T, out]
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [S, R, in]
    B: torch.Tensor,  # [S, out, R]
    scales: torch.Tensor,  # [S] float32
    ranks: torch.Tensor,  # [S] int32
    meta: LoraBatchMeta,
) -> None:
    """y += scale * x A[:r]^T B[:, :r]^T, one segment at a time, reading only each slot's real rank."""
    slot_ranks, slot_scales = ranks.tolist(), scales.tolist()
    for segment in meta.segments:
        rank = slot_ranks[segment.slot]
        if rank == 0:
            continue
        a = A[segment.slot, :rank]  # [r, in]
        b = B[segment.slot, :, :rank]  # [out, r]
        scale = slot_scales[segment.slot]
        if segment.first_row >= 0:  # the segment's tokens are a contiguous run of rows: work on views
            rows = slice(segment.first_row, segment.first_row + segment.length)
            y[rows].addmm_(x[rows] @ a.T, b.T, alpha=scale)
        else:
            index = meta.sorted_tokens[segment.start : segment.start + segment.length]  # [n]
            shrunk = x.index_select(0, index) @ a.T  # [n, r]
            y.index_add_(0, index, shrunk @ b.T, alpha=scale)


def _padded_bmm(
    y: torch.Tensor,  # [T, out]
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [S, R, in]
    B: torch.Tensor,  # [S, out, R]
    scales: torch.Tensor,  # [S] float32
    ranks: torch.Tensor,  # [S] int32
    meta: LoraBatchMeta,
) -> None:
    """y += ..., all segments at once: segments padded to the longest one, one weight copy per segment, two bmm."""
    rows, valid = meta.padded_rows  # [G, L] int64, [G, L] bool
    slots = meta.segment_slot_index  # [G]
    within_rank = torch.arange(A.shape[1], device=x.device) < ranks[slots, None]  # [G, R]
    a = A.index_select(0, slots)  # [G, R, in]
    b = torch.where(within_rank[:, None, :], B.index_select(0, slots), 0)  # [G, out, R]
    shrunk = torch.bmm(x[rows], a.transpose(1, 2))  # [G, L, R]
    keep = valid[:, :, None] & within_rank[:, None, :]  # [G, L, R]: real tokens, real rank
    shrunk = torch.where(keep, shrunk, 0) * scales[slots, None, None].to(x.dtype)  # [G, L, R]
    delta = torch.bmm(shrunk, b.transpose(1, 2))  # [G, L, out]
    y.index_add_(0, rows.view(-1), delta.view(-1, y.shape[1]))  # padding adds zeros to row 0
