"""The gathered-LoRA op of an input embedding: each token's adapter rows, by its token id and its slot.

    y[t] += e · scale[s] · A[s, id[t], :] @ B[s]          for every token t whose slot s = slot(t) ≠ -1

with A [S, vocab, R] (peft's lora_embedding_A transposed: a token's row of a slot is one contiguous read),
B [S, R, dim] (lora_embedding_B transposed) and e the embedding's own scale where it has one (Gemma), as peft's
lora.Embedding computes (F.embedding(id, Aᵀ) @ Bᵀ) · scale · e.

In torch, on every device, because it reads only device tensors (the step's per-token slots), never the host plan:
so it is captured in a decode graph as it is and replays for any mix of adapters. Each token's A row is spread into
its slot's R columns of a [T, S·R] matrix, zero elsewhere, and one GEMM with every slot's B stacked [S·R, dim] gives
the deltas: the zeros add nothing (slots hold zeros beyond their rank and no adapter holds a non-finite value), and
the cost, T · S·R · dim, is a small linear layer's: the embedding runs once per step, not once per layer.
"""

from __future__ import annotations

import torch


def add_embedding_lora(
    y: torch.Tensor,  # [T, dim]: the base embedding of the step's tokens
    ids: torch.Tensor,  # [T] int32 or int64: the tokens' ids
    token_slots: torch.Tensor,  # [T] int32: each token's slot, -1 = base model
    A: torch.Tensor,  # [S, vocab, R]
    B: torch.Tensor,  # [S, R, dim], contiguous
    scales: torch.Tensor,  # [S] float32
    embed_scale: torch.Tensor | None = None,  # [] the embedding's scale of its output (Gemma's √dim), if any
) -> None:
    """y += the LoRA rows of each token's slot, in place; base tokens' rows are left exactly as they are."""
    S, _, R = A.shape
    T = ids.shape[0]
    adapted = token_slots >= 0  # [T]
    slots = token_slots.long().clamp(min=0)  # [T]
    rows = A[slots, ids.long()] * adapted[:, None]  # [T, R]
    spread = rows.new_zeros(T, S, R)  # [T, S, R]
    spread[torch.arange(T, device=y.device), slots] = rows
    delta = spread.view(T, S * R) @ B.view(S * R, -1)  # [T, dim]
    delta = (delta.float() * (scales[slots] * adapted)[:, None]).to(y.dtype)  # peft: (· @ Bᵀ) · scale
    if embed_scale is not None:
        delta = delta * embed_scale.to(delta.dtype)
    y += delta
