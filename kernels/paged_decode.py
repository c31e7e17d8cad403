"""Paged decode attention: each sequence's one query token against its context, read through its block table.

Two implementations with one signature, both with launch shapes that depend only on the batch (CUDA-graph safe):
the Triton kernel (`triton_attention.py`, CUDA; as the custom op `loradock::paged_decode`) and `paged_decode_torch`,
plain torch over every position the block table can address, masked: the oracle, and the CPU's stand-in where the
graph-safe decode step is checked without a GPU. `select_paged_decode` picks one for a device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PagedDecode = Callable[..., None]  # (out, q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window)


def paged_decode_torch(
    out: torch.Tensor,  # [B, H, D], written
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [slots, Hkv, D]
    v_cache: torch.Tensor,  # [slots, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32, >= 1
    block_size: int,
    scale: float,
    window: int,  # <= 0: no sliding window
) -> None:
    """out[b] = softmax(scale * q[b] K_bᵀ) V_b over positions [max(0, n_b - window), n_b) of sequence b."""
    batch, max_blocks = block_tables.shape
    positions = torch.arange(max_blocks * block_size, device=q.device)  # [L]: every position a table can address
    slots = block_tables.long()[:, positions // block_size] * block_size + positions % block_size  # [B, L]
    lengths = context_lens.long()[:, None]  # [B, 1]
    allowed = positions[None, :] < lengths  # [B, L]
    if window > 0:
        allowed &= positions[None, :] >= lengths - window
    keys = k_cache.index_select(0, slots.view(-1)).view(batch, -1, *k_cache.shape[1:]).transpose(1, 2)  # [B, Hkv, L, D]
    values = v_cache.index_select(0, slots.view(-1)).view(batch, -1, *v_cache.shape[1:]).transpose(1, 2)
    attended = F.scaled_dot_product_attention(
        q[:, :, None, :], keys.to(q.dtype), values.to(q.dtype), attn_mask=allowed[:, None, None, :], scale=scale,
        enable_gqa=keys.shape[1] != q.shape[1],
    )  # [B, H, 1, D]
    out.copy_(attended[:, :, 0])


def select_paged_decode(device: torch.device) -> PagedDecode:
    """The Triton kernel (as a custom op) on CUDA, the torch version elsewhere."""
    if device.type == "cuda":
        from .custom_ops import paged_decode

        return paged_decode
    return paged_decode_torch
