"""Attention against the paged KV cache, plugged into transformers' attention-function registry.

The HF modelling code computes q/k/v (and RoPE at each token's own position) for the flat batch, then calls
`paged_attention`. It writes the step's new keys and values into the cache, then the step's attention metadata
attends. The model runs with `attn_implementation=ATTENTION_NAME`, and the step's `ForwardContext` (the cache and the
metadata) travels down the model's forward kwargs as `loradock_context`. The metadata comes in two kinds:

- `GroupedAttention`, an eager step's (prefill chunks, mixed steps, decodes outside the graphs): on the CPU (float32
  or bfloat16) every group through the compiled attention (`kernels/cpu_attention.cpp`), each query token against
  its context read in place (a prefill chunk's causal mask is each token's own position); elsewhere each group
  against copies of its contexts gathered from the cache, through torch's SDPA.
- `PagedDecodeAttention`, a decode step's from the persistent decode inputs (the CUDA graphs' path): one query per
  sequence through the paged decode attention (`kernels/paged_decode.py`), which reads the cache in place through
  the block tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ...kernels.cpu_build import KERNEL_DTYPES
from ...kernels.paged_decode import PagedDecode
from .forward_context import ForwardContext

ATTENTION_NAME = "loradock_paged"


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, D]
    attention_mask: torch.Tensor | None,  # unused: masks come from the step metadata
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    loradock_context: ForwardContext | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if loradock_context is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention runs only inside the loradock engine")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported")
    q, k, v = (states[0].transpose(0, 1) for states in (query, key, value))  # [T, H or Hkv, D]
    return attend_in_cache(loradock_context, module.layer_idx, q, k, v, scaling, sliding_window)[None], None


def attend_in_cache(
    context: ForwardContext,
    layer: int,
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:  # [T, H, D]
    """Layer `layer`'s attention for the step: its new keys and values written into the cache, then each query
    against its context through the step's attention metadata."""
    attention, cache = context.attention, context.kv_cache
    k_cache = cache.keys[layer]  # [slots, Hkv, D]
    v_cache = cache.values[layer]
    k_cache.index_copy_(0, attention.slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, attention.slot_mapping, v.to(v_cache.dtype))
    return attention.attend(q, k_cache, v_cache, scaling, sliding_window)


# Key position given to padding in a gathered context: larger than any query position, so the causal
# test `key_pos <= query_pos` masks it out.
PAD_POS = torch.iinfo(torch.int32).max


@dataclass
class AttentionGroup:
    """Queries `rows` of the flat batch attending to cache slots; B sequences, Q queries, L keys each, column j of
    kv_index holding position j (the compiled attention reads a query's context as columns 0 .. its position).
    Decodes are one group of B sequences, Q = 1; a prefill chunk is a group of its own, B = 1."""

    rows: slice  # the group's tokens are contiguous in the flat batch
    kv_index: torch.Tensor  # [B, L] cache slot of each context token (padding: the query's own slot)
    query_pos: torch.Tensor  # [B, Q] absolute position of each query token
    key_pos: torch.Tensor  # [B, L] absolute position of each context token (padding: PAD_POS)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.kv_index.shape[0]

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, Q, L] bool, True where the query may attend. Built once per step per window size."""
        if sliding_window not in self._masks:
            q = self.query_pos[:, :, None]
            k = self.key_pos[:, None, :]
            allowed = k <= q
            if sliding_window is not None:
                allowed &= k > q - sliding_window
            self._masks[sliding_window] = allowed[:, None]
        return self._masks[sliding_window]


@dataclass
class GroupedAttention:
    """An eager step's attention: its T queries in groups, each against its contexts gathered from the cache."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot each token's K/V is written to
    groups: list[AttentionGroup]  # the decode group (if any) first, then one group per prefill chunk
    # the compiled CPU attention (`cached_attention` of the CPU ops), or None: SDPA
    kernel: Callable | None

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scaling: float | None,
               sliding_window: int | None) -> torch.Tensor:
        """q: [T, H, D] -> [T, H, D]; through the compiled kernel when it reads these dtypes."""
        out = q.new_empty(q.shape) if len(self.groups) > 1 else None
        for group in self.groups:
            if self.kernel is not None and q.dtype == k_cache.dtype in KERNEL_DTYPES:
                attended = out[group.rows] if out is not None else q.new_empty(q.shape)  # [B*Q, H, D]
                positions = group.query_pos.view(-1)  # [B*Q]
                scale = scaling if scaling is not None else q.shape[-1] ** -0.5
                self.kernel(
                    attended, q[group.rows], k_cache, v_cache, group.kv_index.expand(len(positions), -1), positions,
                    scale, sliding_window or 0,
                )  # a prefill chunk's one kv_index row, [1, L], read by each of its queries
            else:
                attended = _sdpa(q, group, k_cache, v_cache, scaling, sliding_window)  # [B*Q, H, D]
                if out is not None:
                    out[group.rows] = attended
            if out is None:
                return attended
        return out


@dataclass(frozen=True)
class PagedDecodeAttention:
    """A decode step's attention, views of the first B rows of the persistent decode inputs: one query per sequence
    against its context, read in place through its block table."""

    slot_mapping: torch.Tensor  # [B] int64: cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32: tokens each query attends to, itself included
    block_size: int
    kernel: PagedDecode  # the paged decode attention for the device

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scaling: float | None,
               sliding_window: int | None) -> torch.Tensor:
        """q: [B, H, D] -> [B, H, D]."""
        out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, H, D]
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        self.kernel(out, q.to(k_cache.dtype), k_cache, v_cache, self.block_tables, self.context_lens, self.block_size,
                    scale, sliding_window or 0)
        return out.to(q.dtype)


def _sdpa(
    q: torch.Tensor,  # [T, H, D]
    group: AttentionGroup,
    k_cache: torch.Tensor,  # [slots, Hkv, D]
    v_cache: torch.Tensor,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """The group's queries against copies of their contexts gathered from the cache, through torch's SDPA."""
    keys = _gather(k_cache, group.kv_index).to(q.dtype)  # [B, Hkv, L, D]
    values = _gather(v_cache, group.kv_index).to(q.dtype)
    queries = q[group.rows].view(group.num_seqs, -1, *q.shape[1:]).transpose(1, 2)  # [B, H, Q, D]
    attended = F.scaled_dot_product_attention(
        queries,
        keys,
        values,
        attn_mask=group.mask(sliding_window),
        scale=scaling,
        enable_gqa=keys.shape[1] != queries.shape[1],
    )  # [B, H, Q, D]
    return attended.transpose(1, 2).reshape(-1, *q.shape[1:])  # [B*Q, H, D]


def _gather(cache: torch.Tensor, kv_index: torch.Tensor) -> torch.Tensor:
    """cache [slots, Hkv, D], kv_index [B, L] -> [B, Hkv, L, D]. index_select: several times faster than
    advanced indexing on the CPU."""
    batch, length = kv_index.shape
    return cache.index_select(0, kv_index.view(-1)).view(batch, length, *cache.shape[1:]).transpose(1, 2)


AttentionInterface.register(ATTENTION_NAME, paged_attention)
