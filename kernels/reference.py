"""The gathered-LoRA op in plain torch, written to be read: the oracle the kernels and the fast path must match.

The op, per token t with slot s = token_slots[t] != -1 and for each slice i (columns off_i .. off_i+size_i):
    y[t, off_i:off_i+size_i] += scales[i, s] * (x[t] @ A[i, s, :r].T) @ B[s, off_i:off_i+size_i, :r].T
with r = ranks[i, s]. Weights beyond a slot's rank are never read: they may hold stale values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .operands import check_activations, lora_operands


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
    ops = lora_operands(A, B, scales, ranks, slice_sizes)
    check_activations(y, x, ops)
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
