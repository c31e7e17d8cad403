"""The forward context: what every layer of a step's forward reads, one object for the engine's life.

The attention layers find it in the model's forward kwargs (`loradock_context`) and read the KV cache and the step's
attention metadata; the LoRA layers read its `lora`, the very `LoraMeta` their `LoraContext` was given when they were
attached (HF modules call `self.q_proj(x)` without kwargs); the output head's LoRA layer reads `lora_rows`, the same
grouping for the rows whose logits the step computes (the head runs on those alone). The eager path and the decode
graphs' path run the same object: `lora` and `lora_rows` are allocated once and rewritten in place each step
(inside the decode inputs' packed buffer when decode graphs run, so a decode step's one copy covers them), and
`forward` points `attention` at the metadata of the step it runs: an eager step's `GroupedAttention`, or the
`PagedDecodeAttention` over the decode inputs' persistent buffers that the decode graphs made for the step's bucket.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ...kernels.metadata import LoraMeta
from .kv_cache import PagedKVCache


class StepAttention(Protocol):
    """A step's attention metadata (`attention.GroupedAttention`, `attention.PagedDecodeAttention`)."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V is written to

    def attend(
        self,
        q: torch.Tensor,  # [T, H, D]
        k_cache: torch.Tensor,  # [slots, Hkv, D], this step's keys written
        v_cache: torch.Tensor,  # [slots, Hkv, D]
        scaling: float | None,
        sliding_window: int | None,
    ) -> torch.Tensor:  # [T, H, D]
        """Each query against the cached keys and values of its own context."""


class ForwardContext:
    """The KV cache, the LoRA metadata (allocated once, rewritten in place) and the running forward's attention
    metadata."""

    def __init__(self, kv_cache: PagedKVCache, lora: LoraMeta | None, lora_rows: LoraMeta | None = None):
        """lora: the LoRA metadata of the step's tokens, rewritten in place each step; None without adapter slots.
        lora_rows: that of its logits rows, for the output head's LoRA; None when the head has no slots."""
        self.kv_cache = kv_cache
        self.lora = lora
        self.lora_rows = lora_rows
        self.attention: StepAttention | None = None  # the running forward's, set by `forward`

    def forward(
        self,
        model: torch.nn.Module,
        attention: StepAttention,
        input_ids: torch.Tensor,  # [1, T]
        position_ids: torch.Tensor,  # [1, T]
        **kwargs,
    ) -> torch.Tensor:
        """The model's logits [T or the rows `logits_to_keep` names, vocab] over a flat batch of T tokens, its
        attention reading `attention`."""
        self.attention = attention
        output = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, loradock_context=self, **kwargs)
        return output.logits[0]
