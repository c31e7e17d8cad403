"""The LoRA layer of an input embedding: the base nn.Embedding plus per-slot adapter rows applied per token.

An embedding targeted by adapters is replaced by a LoraEmbedding that owns preallocated slot buffers
`A[slots, vocab, r_max]` (a token's row of a slot is one contiguous read), `B[slots, r_max, dim]`, `scales[slots]`
and `ranks[slots]`; loading an adapter into a slot is a copy. Each token's slot comes from the step's LoraMeta, the
one every LoRA layer reads (`LoraContext`): the embedding's input holds the step's T tokens in the metadata's order.
Only plain LoRA is served here: peft refuses lora_bias on embeddings, and DoRA ones are refused when read.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.embedding_lora import add_embedding_lora
from .lora_layer import LoraContext


class LoraEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, context: LoraContext, num_slots: int, max_rank: int, dtype: torch.dtype):
        super().__init__()
        self.base = base
        self.context = context
        device = base.weight.device
        vocab, dim = base.num_embeddings, base.embedding_dim
        A = torch.zeros(num_slots, vocab, max_rank, dtype=dtype, device=device)  # [S, vocab, R]
        self.register_buffer("lora_A", A)
        self.register_buffer("lora_B", torch.zeros(num_slots, max_rank, dim, dtype=dtype, device=device))  # [S, R, dim]
        self.register_buffer("scales", torch.zeros(num_slots, dtype=torch.float32, device=device))  # [S]
        self.register_buffer("ranks", torch.zeros(num_slots, dtype=torch.int32, device=device))  # [S]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [..., T] -> [..., T, dim]
        y = self.base(ids)
        meta = self.context.meta
        if not meta.active:  # no token of this step uses an adapter
            return y
        flat_ids = ids.reshape(-1)  # [T]
        add_embedding_lora(y.view(-1, y.shape[-1]), flat_ids, meta.token_slots[: flat_ids.shape[0]], self.lora_A,
                           self.lora_B, self.scales, getattr(self.base, "embed_scale", None))
        return y

    def load_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float,
                  dora_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        """Copy one adapter's weights for this embedding into `slot`, as LoraLinear.load_slot does; A: [r, vocab]
        (lora_embedding_A), B: [dim, r] (lora_embedding_B). A None clears the slot. DoRA and lora_bias never reach an
        embedding (refused when read)."""
        assert dora_scale is None and bias is None, "plain LoRA only on an embedding"
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if A is None:
            self.scales[slot] = 0.0
            self.ranks[slot] = 0
            return
        rank = A.shape[0]
        self.lora_A[slot, :, :rank].copy_(A.T, non_blocking=True)
        self.lora_B[slot, :rank].copy_(B.T, non_blocking=True)
        self.scales[slot] = scale
        self.ranks[slot] = rank
