"""The LoRA backend of CUDA: two Triton kernels, shrink (x -> buf) and expand (y += scale * buf B^T; the rows of
a slot the output affine maps, DoRA's and lora_bias', then y = out_scale * y + out_shift in the same epilogue).

Both kernels run on a grid sized from static maxima: (work along K or N, cdiv(T, BLOCK_M), max_slots). Program
(_, m, g) handles rows m*BLOCK_M .. of segment g of the step's metadata and returns at once when that segment
is padding or shorter, so the launch shapes never depend on the adapter mix (CUDA-graph safe). Slot -1 tokens
are in no segment, hence never touched. Loads are masked by the slot's real rank: bytes beyond it are never
read. Accumulation is fp32; inputs may be fp32, bf16 or fp16.

Under TRITON_INTERPRET=1 (set before this module is imported: @triton.jit reads it) the kernels run on the
CPU, in fp32 only. They call only Triton builtins, no @jit helpers of triton.language (tl.cdiv, tl.zeros):
those were decorated when triton was imported, which may have happened before TRITON_INTERPRET was set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import custom_ops
from .backend import LoraBackend
from .metadata import LoraMeta
from .operands import LoraOperands


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, in]
    a_ptr,  # [S, R, in]
    buf_ptr,  # [T, R] float32
    sorted_tokens_ptr,  # [T] int32
    segment_slots_ptr,  # [max_slots] int32
    segment_starts_ptr,  # [max_slots] int32
    segment_lengths_ptr,  # [max_slots] int32
    ranks_ptr,  # [S] int32
    in_features,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_bt,
    stride_br,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_PER_SPLIT: tl.constexpr,  # in_features / splits rounded up to whole BLOCK_K
    ATOMIC: tl.constexpr,  # several K splits add into buf
):
    """buf[t, :r] (+)= x[t] @ A[slot, :r].T over one K split, for one block of one segment's tokens."""
    split = tl.program_id(0)
    block_m = tl.program_id(1)
    segment = tl.program_id(2)
    length = tl.load(segment_lengths_ptr + segment)
    if block_m * BLOCK_M >= length:  # padded segment, or past this segment's end
        return
    slot = tl.load(segment_slots_ptr + segment).to(tl.int64)
    rank = tl.load(ranks_ptr + slot)
    start = tl.load(segment_starts_ptr + segment)

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] positions within the segment
    row_mask = offs_m < length
    rows = tl.load(sorted_tokens_ptr + start + offs_m, mask=row_mask, other=0).to(tl.int64)  # [BLOCK_M]
    offs_r = tl.arange(0, BLOCK_R)
    rank_mask = offs_r < rank  # [BLOCK_R]
    a_base = a_ptr + slot * stride_as

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
        a_tile = tl.load(  # [BLOCK_K, BLOCK_R]: A[slot, :r, k..]^T
            a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=rank_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        acc = tl.dot(x_tile, a_tile, acc, input_precision="ieee")  # ieee: no tf32 for fp32 inputs

    buf_ptrs = buf_ptr + rows[:, None] * stride_bt + offs_r[None, :] * stride_br
    buf_mask = row_mask[:, None] & rank_mask[None, :]
    if ATOMIC:
        tl.atomic_add(buf_ptrs, acc, mask=buf_mask)
    else:
        tl.store(buf_ptrs, acc, mask=buf_mask)


@triton.jit
def _expand_kernel(
    buf_ptr,  # [T, R] float32
    b_ptr,  # [S, out, R]
    y_ptr,  # [T, out]
    sorted_tokens_ptr,  # [T] int32
    segment_slots_ptr,  # [max_slots] int32
    segment_starts_ptr,  # [max_slots] int32
    segment_lengths_ptr,  # [max_slots] int32
    ranks_ptr,  # [S] int32
    scales_ptr,  # [S] float32
    out_scale_ptr,  # [S, out] float32, contiguous (HAS_AFFINE)
    out_shift_ptr,  # [S, out] float32, contiguous (HAS_AFFINE)
    out_mapped_ptr,  # [S] int32 (HAS_AFFINE)
    out_features,
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
    HAS_AFFINE: tl.constexpr,  # the output affine's pointers are given
):
    """y[t, cols] += scale * buf[t, :r] @ B[slot, cols, :r].T for one column block; for a mapped slot then
    y[t, cols] = out_scale[slot, cols] * y[t, cols] + out_shift[slot, cols], before the one rounding into y."""
    block_n = tl.program_id(0)
    block_m = tl.program_id(1)
    segment = tl.program_id(2)
    length = tl.load(segment_lengths_ptr + segment)
    if block_m * BLOCK_M >= length:
        return
    slot = tl.load(segment_slots_ptr + segment).to(tl.int64)
    rank = tl.load(ranks_ptr + slot)
    scale = tl.load(scales_ptr + slot)
    start = tl.load(segment_starts_ptr + segment)

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < length
    rows = tl.load(sorted_tokens_ptr + start + offs_m, mask=row_mask, other=0).to(tl.int64)  # [BLOCK_M]
    offs_r = tl.arange(0, BLOCK_R)
    rank_mask = offs_r < rank
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] columns of y and B
    col_mask = cols < out_features

    shrunk = tl.load(  # [BLOCK_M, BLOCK_R]
        buf_ptr + rows[:, None] * stride_bt + offs_r[None, :] * stride_br,
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
    out = y_tile.to(tl.float32) + delta  # [BLOCK_M, BLOCK_N]
    if HAS_AFFINE:
        if tl.load(out_mapped_ptr + slot) != 0:
            out_scale = tl.load(out_scale_ptr + slot * out_features + cols, mask=col_mask, other=1.0)  # [BLOCK_N]
            out_shift = tl.load(out_shift_ptr + slot * out_features + cols, mask=col_mask, other=0.0)  # [BLOCK_N]
            out = out * out_scale[None, :] + out_shift[None, :]
    tl.store(y_ptrs, out.to(y_tile.dtype), mask=y_mask)


def _block_m(num_tokens: int) -> int:
    """Rows per program: small for decode-sized steps (segments of a few tokens), larger for prefill."""
    return 16 if num_tokens <= 256 else 64


def _block_r(max_rank: int) -> int:
    """The rank tile: the padded rank R rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(max_rank))


def _split_k(num_tokens: int, in_features: int) -> int:
    """K splits of the shrink: decode-sized steps with a long reduction need more programs to fill the GPU."""
    return 4 if num_tokens <= 256 and in_features >= 2048 else 1


def launch_shrink(
    x: torch.Tensor,  # [T, in]
    A: torch.Tensor,  # [S, R, in]
    buf: torch.Tensor,  # [T, R] float32, zeroed when split_k > 1
    ranks: torch.Tensor,  # [S] int32
    sorted_tokens: torch.Tensor,  # [>= T] int32
    segment_slots: torch.Tensor,  # [max_slots] int32
    segment_starts: torch.Tensor,  # [max_slots] int32
    segment_lengths: torch.Tensor,  # [max_slots] int32
    split_k: int,
) -> None:
    """buf[t, :r] = x[t] @ A[slot(t), :r].T for every adapter token t (the op `loradock::lora_shrink`)."""
    _, R, in_features = A.shape
    num_tokens = x.shape[0]
    block_m, block_r = _block_m(num_tokens), _block_r(R)
    block_k = min(256 if block_r <= 32 else 128, triton.next_power_of_2(max(in_features, 16)))
    k_per_split = triton.cdiv(in_features, split_k * block_k) * block_k
    grid = (split_k, triton.cdiv(num_tokens, block_m), segment_slots.shape[0])
    _shrink_kernel[grid](
        x, A, buf, sorted_tokens, segment_slots, segment_starts, segment_lengths, ranks,
        in_features,
        x.stride(0), x.stride(1),
        A.stride(0), A.stride(1), A.stride(2),
        buf.stride(0), buf.stride(1),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, K_PER_SPLIT=k_per_split, ATOMIC=split_k > 1,
    )  # fmt: skip


def launch_expand(
    y: torch.Tensor,  # [T, out], may be strided
    buf: torch.Tensor,  # [T, R] float32 from the shrink
    B: torch.Tensor,  # [S, out, R]
    scales: torch.Tensor,  # [S] float32
    ranks: torch.Tensor,  # [S] int32
    sorted_tokens: torch.Tensor,  # [>= T] int32
    segment_slots: torch.Tensor,  # [max_slots] int32
    segment_starts: torch.Tensor,  # [max_slots] int32
    segment_lengths: torch.Tensor,  # [max_slots] int32
    out_scale: torch.Tensor | None = None,  # [S, out] float32, contiguous
    out_shift: torch.Tensor | None = None,  # [S, out] float32, contiguous
    out_mapped: torch.Tensor | None = None,  # [S] int32
) -> None:
    """y[t] += scales[slot] * buf[t, :r] @ B[slot, :, :r].T, then y[t] = out_scale[slot] * y[t] + out_shift[slot]
    where out_mapped[slot], in place (the op `loradock::lora_expand`; the affine's three tensors all or none)."""
    num_tokens, R = buf.shape
    out_features = B.shape[1]
    block_m, block_r = _block_m(num_tokens), _block_r(R)
    block_n = 128 if block_r <= 32 else 64
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(num_tokens, block_m), segment_slots.shape[0])
    has_affine = out_mapped is not None
    unused = scales  # any tensor stands in for the affine's pointers when there is none: never read
    _expand_kernel[grid](
        buf, B, y, sorted_tokens, segment_slots, segment_starts, segment_lengths, ranks, scales,
        out_scale if has_affine else unused, out_shift if has_affine else unused, out_mapped if has_affine else unused,
        out_features,
        buf.stride(0), buf.stride(1),
        B.stride(0), B.stride(1), B.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, HAS_AFFINE=has_affine,
    )  # fmt: skip


def lora_shrink(x: torch.Tensor, A: torch.Tensor, ranks: torch.Tensor, meta: LoraMeta,
                split_k: int | None = None) -> torch.Tensor:
    """buf [T, R] float32 with buf[t, :r] = x[t] @ A[slot(t), :r].T for every adapter token t; the other entries
    are unspecified and never read by the expand."""
    split_k = split_k or _split_k(x.shape[0], A.shape[2])
    allocate = torch.empty if split_k == 1 else torch.zeros
    buf = allocate(x.shape[0], A.shape[1], dtype=torch.float32, device=x.device)  # [T, R]
    custom_ops.lora_shrink(x, A, buf, ranks, meta.sorted_tokens, meta.segment_slots, meta.segment_starts,
                           meta.segment_lengths, split_k)
    return buf


class TritonBackend(LoraBackend):
    """One shrink launch and one expand launch per LoRA layer, as the operators `loradock::lora_shrink` and
    `loradock::lora_expand`."""

    name = "triton"

    def __init__(self, split_k: int | None = None):
        self.split_k = split_k  # None: chosen per call from the shapes

    def _add(self, y: torch.Tensor, x: torch.Tensor, ops: LoraOperands, meta: LoraMeta) -> None:
        buf = lora_shrink(x, ops.A, ops.ranks, meta, self.split_k)  # [T, R]
        custom_ops.lora_expand(y, buf, ops.B, ops.scales, ops.ranks, meta.sorted_tokens, meta.segment_slots,
                               meta.segment_starts, meta.segment_lengths, *(ops.affine or (None, None, None)))
