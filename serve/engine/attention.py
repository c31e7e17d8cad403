"""Attention against the paged KV cache, plugged into transformers' attention-function registry.

The HF modelling code computes q/k/v (and RoPE at each token's own position) for the flat batch, then
calls this function. It writes the step's new keys and values into the cache, then attends each group of
queries to its gathered context. The model runs with `attn_implementation=ATTENTION_NAME`, and the step's
metadata travels down the model's forward kwargs as `loradock_step`.

Decode tokens on the CPU in float32 go through the compiled decode attention (`kernels/cpu_attention.cpp`), which
reads the cache in place; a decode step run from the persistent decode inputs (`DecodeStep`, the CUDA graphs'
path) through the paged decode attention (`kernels/paged_decode.py`), which reads it in place through the block
tables; everything else (prefill chunks, mixed steps, other dtypes) through torch's SDPA over contexts gathered from
the cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .batch import AttentionGroup, StepBatch
from .decode_inputs import DecodeStep

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
    loradock_step: StepBatch | DecodeStep | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if loradock_step is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention runs only inside the loradock engine")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping is not supported")
    step = loradock_step
    k_cache = step.kv_cache.keys[module.layer_idx]  # [slots, Hkv, D]
    v_cache = step.kv_cache.values[module.layer_idx]
    k_cache.index_copy_(0, step.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, step.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))

    q = query[0].transpose(0, 1)  # [T, H, D]
    if isinstance(step, DecodeStep):  # one query per sequence, against the cache in place through block tables
        out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [B, H, D]
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        step.attend(out, q.to(k_cache.dtype), k_cache, v_cache, step.block_tables, step.context_lens,
                    step.kv_cache.block_size, scale, sliding_window or 0)
        return out.to(q.dtype)[None], None
    out = q.new_empty(q.shape) if len(step.groups) > 1 else None
    for group in step.groups:
        if group.decode and step.decode_kernel is not None and q.dtype == k_cache.dtype == torch.float32:
            attended = out[group.rows] if out is not None else q.new_empty(q.shape)  # [B, H, D]
            scale = scaling if scaling is not None else q.shape[-1] ** -0.5
            step.decode_kernel(
                attended, q[group.rows], k_cache, v_cache, group.kv_index, group.query_pos.view(-1), scale,
                sliding_window or 0,
            )
        else:
            attended = _sdpa(q, group, k_cache, v_cache, scaling, sliding_window)  # [B*Q, H, D]
            if out is not None:
                out[group.rows] = attended
        if out is None:
            return attended[None], None
    return out[None], None  # [1, T, H, D]


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
