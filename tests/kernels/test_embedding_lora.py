"""The embedding's gathered-LoRA op against peft's formula, token by token:
(F.embedding(id, Aᵀ) @ Bᵀ) · scale · e."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loradock.kernels.embedding_lora import add_embedding_lora

S, VOCAB, R, DIM = 3, 50, 8, 16
RANKS = (8, 3, 0)  # slot 2 holds no adapter


def slot_buffers(generator):
    """Per slot peft's lora_embedding_A [r, vocab] and _B [dim, r], and the op's buffers holding them, zero beyond
    each rank."""
    A, B = torch.zeros(S, VOCAB, R), torch.zeros(S, R, DIM)  # [S, vocab, R], [S, R, dim]
    weights = []
    for slot, rank in enumerate(RANKS):
        a, b = torch.randn(rank, VOCAB, generator=generator), torch.randn(DIM, rank, generator=generator)
        A[slot, :, :rank], B[slot, :rank] = a.T, b.T
        weights.append((a, b))
    return A, B, weights


@pytest.mark.parametrize("embed_scale", [None, torch.tensor(8.0)])
def test_each_token_gets_its_slots_rows_as_peft_computes_them(embed_scale):
    generator = torch.Generator().manual_seed(0)
    A, B, weights = slot_buffers(generator)
    scales = torch.tensor([2.0, 0.5, 1.0])
    ids = torch.randint(VOCAB, (12,), generator=generator)
    slots = torch.tensor([0, -1, 1, 1, 0, 2, -1, 0, 1, -1, 2, 0], dtype=torch.int32)
    base = torch.randn(12, DIM, generator=generator)
    y = base.clone()
    add_embedding_lora(y, ids, slots, A, B, scales, embed_scale)
    for t, slot in enumerate(slots.tolist()):
        if slot < 0 or RANKS[slot] == 0:
            assert torch.equal(y[t], base[t]), t  # untouched, bit for bit
            continue
        a, b = weights[slot]
        delta = (F.embedding(ids[t : t + 1], a.T) @ b.T) * scales[slot].item()  # peft's lora.Embedding
        if embed_scale is not None:
            delta = delta * embed_scale
        torch.testing.assert_close(y[t], base[t] + delta[0], rtol=1e-6, atol=1e-5)
