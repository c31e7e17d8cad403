"""Triton kernels of the gathered-LoRA op: shrink (x -> buf) and expand (y += scale * buf B^T).

Both kernels run on a grid sized from static maxima: (slice work, cdiv(T, BLOCK_M), max_slots). Program
(_, m, g) handles rows m*BLOCK_M .. of segment g of the step's metadata and returns at once when that segment
is padding or shorter, so the launch shapes never depend on the adapter mix (CUDA-graph safe). Slot -1 tokens
are in no segment, hence never touched. Loads are masked by the slot's real rank: bytes beyond it are never
read. Accumulation is fp32; inputs may be fp32, bf16 or fp16.

Under TRITON_INTERPRET=1 (set before this module is imported: @triton.jit reads it) the kernels run on the
CPU, in fp32 only. They call only Triton builtins, no @jit helpers of triton.language (tl.cdiv, tl.zeros):
those were decorated when triton was imported, which may have happened before TRITON_INTERPRET was set.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from .metadata import LoraBatchMeta
from .operands import LoraOperands


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, in]
    a_ptr,  # [n, S, R, in]
    buf_ptr,  # [n, T, R] float32
    sorted_tokens_ptr,  # [T] int32
    segment_slots_ptr,  # [max_slots] int32
    segment_starts_ptr,  # [max_slots] int32
    segment_lengths_ptr,  # [max_slots] int32
    ranks_ptr,  # [n, S] int32, contiguous
    num_slots,
    in_features,
    stride_xt,
    stride_xk,
    stride_an,
    stride_as,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_bt,
    stride_br,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,  # in_features / SPLIT_K rounded up to whole BLOCK_K
):
    """buf[i, t, :r] (+)= x[t] @ A[i, slot, :r].T over one K split, for one block of one segment's tokens."""
    slice_id = tl.program_id(0) // SPLIT_K
    split = tl.program_id(0) % SPLIT_K
    block_m = tl.program_id(1)
    segment = tl.program_id(2)
    length = tl.load(segment_lengths_ptr + segment)
    if block_m * BLOCK_M >= length:  # padded segment, or past this segment's end
        return
    slot = tl.load(segment_slots_ptr + segment).to(tl.int64)
    rank = tl.load(ranks_ptr + slice_id * num_slots + slot)
    start = tl.load(segment_starts_ptr + segment)

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] positions within the segment
    row_mask = offs_m < length
    rows = tl.load(sorted_tokens_ptr + start + offs_m, mask=row_mask, other=0).to(tl.int64)  # [BLOCK_M]
    offs_r = tl.arange(0, BLOCK_R)
    rank_mask = offs_r < rank  # [BLOCK_R]
    a_base = a_ptr + slice_id * stride_an + slot * stride_as

    k_begin = split * K_PER_SPLIT
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    # constexpr loop bounds: Triton 3.6's interpreter cannot turn a runtime value into a range() bound
    for k in range(0, K_PER_SPLIT, BLOCK_K):
        offs_k = k_begin + k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < in_features
        x_tile = tl.load(  # [BLOCK_M, BLOCK_K]
            x_ptr + rows[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        a_tile = tl.load(  # [BLOCK_K, BLOCK_R]: A[i, slot, :r, k..]^T
            a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=rank_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        acc = tl.dot(x_tile, a_tile, acc, input_precision="ieee")  # ieee: no tf32 for fp32 inputs

    buf_ptrs = buf_ptr + slice_id * stride_bn + rows[:, None] * stride_bt + offs_r[None, :] * stride_br
    buf_mask = row_mask[:, None] & rank_mask[None, :]
    if SPLIT_K == 1:
        tl.store(buf_ptrs, acc, mask=buf_mask)
    else:
        tl.atomic_add(buf_ptrs, acc, mask=buf_mask)


@triton.jit
def _expand_kernel(
    buf_ptr,  # [n, T, R] float32
    b_ptr,  # [S, out_total, R]
    y_ptr,  # [T, out_total]
    sorted_tokens_ptr,  # [T] int32
    segment_slots_ptr,  # [max_slots] int32
    segment_starts_ptr,  # [max_slots] int32
    segment_lengths_ptr,  # [max_slots] int32
    ranks_ptr,  # [n, S] int32, contiguous
    scales_ptr,  # [n, S] float32, contiguous
    slice_bounds_ptr,  # [2, n] int32: first column, columns
    num_slots,
    num_slices,
    blocks_per_slice,
    stride_bn,
    stride_bt,
    stride_br,
    stride_bs,
    stride_bo,
    stride_bk,
    stride_yt,
    stride_yo,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """y[t, cols] += scale * buf[i, t, :r] @ B[slot, cols, :r].T for one column block of slice i."""
    slice_id = tl.program_id(0) // blocks_per_slice
    block_n = tl.program_id(0) % blocks_per_slice
    block_m = tl.program_id(1)
    segment = tl.program_id(2)
    size = tl.load(slice_bounds_ptr + num_slices + slice_id)
    length = tl.load(segment_lengths_ptr + segment)
    if (block_m * BLOCK_M >= length) | (block_n * BLOCK_N >= size):
        return
    offset = tl.load(slice_bounds_ptr + slice_id)
    slot = tl.load(segment_slots_ptr + segment).to(tl.int64)
    rank = tl.load(ranks_ptr + slice_id * num_slots + slot)
    scale = tl.load(scales_ptr + slice_id * num_slots + slot)
    start = tl.load(segment_starts_ptr + segment)

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < length
    rows = tl.load(sorted_tokens_ptr + start + offs_m, mask=row_mask, other=0).to(tl.int64)  # [BLOCK_M]
    offs_r = tl.arange(0, BLOCK_R)
    rank_mask = offs_r < rank
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = offs_n < size
    cols = offset + offs_n  # [BLOCK_N] columns of y and B

    shrunk = tl.load(  # [BLOCK_M, BLOCK_R]
        buf_ptr + slice_id * stride_bn + rows[:, None] * stride_bt + offs_r[None, :] * stride_br,
        mask=row_mask[:, None] & rank_mask[None, :],
        other=0.0,
    )
    b_tile = tl.load(  # [BLOCK_R, BLOCK_N]: B[slot, cols, :r]^T
        b_ptr + slot * stride_bs + cols[None, :] * stride_bo + offs_r[:, None] * stride_bk,
        mask=rank_mask[:, None] & col_mask[None, :],
        other=0.0,
    )
    delta = tl.dot(shrunk.to(b_tile.dtype), b_tile, input_precision="ieee") * scale  # [BLOCK_M, BLOCK_N]

    y_ptrs = y_ptr + rows[:, None] * stride_yt + cols[None, :] * stride_yo
    y_mask = row_mask[:, None] & col_mask[None, :]
    y_tile = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y_tile.to(tl.float32) + delta).to(y_tile.dtype), mask=y_mask)


def _block_m(num_tokens: int) -> int:
    """Rows per program: small for decode-sized steps (segments of a few tokens), larger for prefill."""
    return 16 if num_tokens <= 256 else 64


def _block_r(max_rank: int) -> int:
    """The rank tile: the padded rank R rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(max_rank))


def _split_k(num_tokens: int, in_features: int) -> int:
    """K splits of the shrink: decode-sized steps with a long reduction need more programs to fill the GPU."""
    return 4 if num_tokens <= 256 and in_features >= 2048 else 1


@lru_cache(maxsize=64)
def _slice_bounds(offsets: tuple[int, ...], sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[2, n] int32 on `device`: each slice's first column and width.

    Made on the first call with a layout and reused after: run each layout once before capturing a CUDA graph.
    """
    return torch.tensor([offsets, sizes], dtype=torch.int32, device=device)


def lora_shrink(
    x: torch.Tensor,
    A: torch.Tensor,
    ranks: torch.Tensor,
    meta: LoraBatchMeta,
    split_k: int | None = None,
) -> torch.Tensor:
    """buf[i, t, :r] = x[t] @ A[i, slot(t), :r].T for every adapter token t and slice i, in fp32.

    x: [T, in]; A: [n, S, R, in]; ranks: [n, S] int32. Returns buf [n, T, R] float32; only the adapter
    tokens' rows up to each slot's rank are written (the rest is unspecified and never read by `lora_expand`).
    """
    n, num_slots, R, in_features = A.shape
    num_tokens = x.shape[0]
    block_m, block_r = _block_m(num_tokens), _block_r(R)
    split_k = split_k or _split_k(num_tokens, in_features)
    allocate = torch.empty if split_k == 1 else torch.zeros
    buf = allocate(n, num_tokens, R, dtype=torch.float32, device=x.device)  # [n, T, R]
    block_k = min(256 if block_r <= 32 else 128, triton.next_power_of_2(max(in_features, 16)))
    k_per_split = triton.cdiv(in_features, split_k * block_k) * block_k
    grid = (n * split_k, triton.cdiv(num_tokens, block_m), meta.max_slots)
    _shrink_kernel[grid](
        x, A, buf,
        meta.sorted_tokens, meta.segment_slots, meta.segment_starts, meta.segment_lengths, ranks.contiguous(),
        num_slots, in_features,
        x.stride(0), x.stride(1),
        A.stride(0), A.stride(1), A.stride(2), A.stride(3),
        buf.stride(0), buf.stride(1), buf.stride(2),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=split_k, K_PER_SPLIT=k_per_split,
    )  # fmt: skip
    return buf


def lora_expand(
    y: torch.Tensor,
    buf: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    meta: LoraBatchMeta,
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
) -> None:
    """y[t, slice i] += scales[i, slot] * buf[i, t, :r] @ B[slot, slice i, :r].T, in place, y may be strided.

    y: [T, out_total]; buf: [n, T, R] float32 from `lora_shrink`; B: [S, out_total, R];
    scales: [n, S] float32; ranks: [n, S] int32; offsets, sizes: each slice's first column and width.
    """
    n, num_tokens, R = buf.shape
    block_m, block_r = _block_m(num_tokens), _block_r(R)
    block_n = 128 if block_r <= 32 else 64
    blocks_per_slice = triton.cdiv(max(sizes), block_n)
    grid = (n * blocks_per_slice, triton.cdiv(num_tokens, block_m), meta.max_slots)
    _expand_kernel[grid](
        buf, B, y,
        meta.sorted_tokens, meta.segment_slots, meta.segment_starts, meta.segment_lengths,
        ranks.contiguous(), scales.contiguous(), _slice_bounds(offsets, sizes, y.device),
        B.shape[0], n, blocks_per_slice,
        buf.stride(0), buf.stride(1), buf.stride(2),
        B.stride(0), B.stride(1), B.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
    )  # fmt: skip


def lora_triton(
    y: torch.Tensor, x: torch.Tensor, ops: LoraOperands, meta: LoraBatchMeta, split_k: int | None = None
) -> None:
    """The op as one shrink launch and one expand launch, all slices fused. y: [T, out_total] (may be strided);
    x: [T, in]; ops: checked weights (`lora_operands`) matching x and y; meta: the step's metadata."""
    buf = lora_shrink(x, ops.A, ops.ranks, meta, split_k)  # [n, T, R]
    lora_expand(y, buf, ops.B, ops.scales, ops.ranks, meta, ops.offsets, ops.sizes)
