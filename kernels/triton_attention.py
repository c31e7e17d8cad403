"""Paged decode attention as a Triton kernel: one query token per sequence against its keys and values read in
place from the paged KV cache through the block table.

    out[b, h] = sum_j softmax_j(scale * q[b, h] . K[slot(b, j), h // G]) * V[slot(b, j), h // G]
    over positions j in [max(0, n_b - window), n_b), n_b = context_lens[b], slot(b, j) = table[b, j // bs] * bs + j % bs

The grid is fixed, (sequences, kv heads): the launch shape depends only on the batch bucket, never on the context
lengths, so a captured CUDA graph replays for any mix of them. A program walks its sequence's context BLOCK_N
positions at a time with an online softmax, for the G query heads that share its kv head at once (grouped-query
attention reads each key and value once). Accumulation is fp32. Under TRITON_INTERPRET=1 it runs on the CPU
(fp32); like the LoRA kernels it calls only Triton builtins and this module's own @jit functions (the reductions'
combiners), never triton.language's @jit helpers such as tl.max or tl.sum (see triton_lora.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


@triton.jit
def _plus(a, b):
    return a + b


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [slots, Hkv, D]
    v_ptr,  # [slots, Hkv, D]
    out_ptr,  # [B, H, D]
    block_tables_ptr,  # [B, max_blocks] int32
    context_lens_ptr,  # [B] int32
    scale,
    window,  # <= 0: none
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_tb,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two, at least 16 (tl.dot's minimum)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two, at least 16
    BLOCK_SIZE: tl.constexpr,  # tokens per KV cache block
    BLOCK_N: tl.constexpr,  # context positions per iteration, a power of two, at least 16
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    length = tl.load(context_lens_ptr + seq)
    start = tl.where(window > 0, tl.maximum(length - window, 0), 0)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g  # [GROUP_PAD]
    q = tl.load(  # [GROUP_PAD, BLOCK_D]
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    best = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)  # running max of the scores
    total = tl.full((GROUP_PAD,), 0.0, dtype=tl.float32)  # running sum of exp(score - best)
    acc = tl.full((GROUP_PAD, BLOCK_D), 0.0, dtype=tl.float32)
    first = (start // BLOCK_N) * BLOCK_N
    for position in range(first, length, BLOCK_N):
        offs_n = position + tl.arange(0, BLOCK_N)  # [BLOCK_N] context positions
        n_mask = (offs_n >= start) & (offs_n < length)
        blocks = tl.load(block_tables_ptr + seq * stride_tb + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        slots = blocks.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE  # [BLOCK_N]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [GROUP_PAD, BLOCK_N]
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.reduce(scores, 1, _larger))
        weights = tl.exp(scores - new_best[:, None])  # [GROUP_PAD, BLOCK_N]
        rescale = tl.exp(best - new_best)
        v = tl.load(v_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision="ieee")
        total = total * rescale + tl.reduce(weights, 1, _plus)
        best = new_best

    out = acc / total[:, None]
    tl.store(
        out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=g_mask[:, None] & d_mask[None, :],
    )


def paged_decode_triton(
    out: torch.Tensor,  # [B, H, D], written
    q: torch.Tensor,  # [B, H, D], unit stride along D
    k_cache: torch.Tensor,  # [slots, Hkv, D], unit stride along D
    v_cache: torch.Tensor,  # [slots, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32, >= 1
    block_size: int,
    scale: float,
    window: int,
) -> None:
    """out[b] = the attention of q[b] over its context in the paged cache (see the module docstring)."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    _paged_decode_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale, window,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        BLOCK_N=max(16, triton.next_power_of_2(block_size)),
    )  # fmt: skip
