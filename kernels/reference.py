"""The gathered-LoRA op in plain torch, written to be read: the oracle the backends must match.

The op, per token t with slot s = token_slots[t] != -1:
    y[t] += scales[s] * (x[t] @ A[s, :r].T) @ B[s, :, :r].T       with r = ranks[s]
and then, where the slot is mapped by an output affine (DoRA, lora_bias):
    y[t] = affine.scale[s] * y[t] + affine.shift[s]
Weights beyond a slot's rank, and the affine's vectors of slots it does not map, may hold stale values: they never
reach y.
"""

from __future__ import annotations

import torch

from .operands import OutputAffine, check_activations, lora_operands


def lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
    affine: OutputAffine | None = None,
) -> None:
    """The readable oracle: gather each token's own A and B, mask them by rank, two bmm in fp32; y += result, then
    the mapped slots' rows through the affine, in fp32.

    y: [T, out] (in place, may be strided); x: [T, in]; A: [S, R, in]; B: [S, out, R]; scales: [S] float32;
    ranks: [S] int32; token_slots: [T] (-1 = none); affine: scale and shift [S, out], mapped [S].
    """
    ops = lora_operands(A, B, scales, ranks, affine)
    check_activations(y, x, ops)
    tokens = (token_slots >= 0).nonzero().squeeze(1)  # [N]: the tokens that use an adapter
    slots = token_slots[tokens].long()  # [N]
    within_rank = torch.arange(A.shape[1], device=x.device) < ranks[slots, None]  # [N, R]
    a = torch.where(within_rank[:, :, None], A[slots], 0).float()  # [N, R, in]
    b = torch.where(within_rank[:, None, :], B[slots], 0).float()  # [N, out, R]
    shrunk = torch.bmm(a, x[tokens].float()[:, :, None])  # [N, R, 1]
    delta = torch.bmm(b, shrunk).squeeze(2) * scales[slots, None]  # [N, out]
    if affine is None:
        y.index_add_(0, tokens, delta.to(y.dtype))
        return
    rows = y[tokens].float() + delta  # [N, out]
    mapped = affine.mapped[slots].bool()[:, None]  # [N, 1]
    rows = torch.where(mapped, rows * affine.scale[slots] + affine.shift[slots], rows)  # [N, out]; unmapped rows keep theirs
    y.index_copy_(0, tokens, rows.to(y.dtype))
