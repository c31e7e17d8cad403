"""Paged decode attention: the Triton kernel (interpreted; compiled on CUDA) and its torch twin against a naive oracle."""

from __future__ import annotations

import pytest
import torch
from loradock.kernels import custom_ops
from loradock.kernels.paged_decode import paged_decode_torch

# ---------------------------------------------------------------------------------------------- paged decode attention


def naive_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window):
    """Each sequence's query against its positions one by one, in fp32: the oracle for both implementations."""
    out = torch.empty(q.shape, dtype=torch.float32)
    group = q.shape[1] // k_cache.shape[1]
    for b, length in enumerate(context_lens.tolist()):
        positions = torch.arange(max(0, length - window) if window > 0 else 0, length)
        slots = block_tables[b].long()[positions // block_size] * block_size + positions % block_size
        keys = k_cache[slots].float().repeat_interleave(group, 1)  # [n, H, D]
        values = v_cache[slots].float().repeat_interleave(group, 1)
        weights = (torch.einsum("hd,nhd->hn", q[b].float(), keys) * scale).softmax(-1)
        out[b] = torch.einsum("hn,nhd->hd", weights, values)
    return out


def paged_case(device: str, dtype: torch.dtype, heads: int = 6, kv_heads: int = 2, head_dim: int = 40,
               block_size: int = 4, seed: int = 0):
    """Five sequences of 1 to 32 tokens over shuffled blocks of a cache that also holds other data."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks, max_blocks = 48, 8
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=generator)
    q = torch.randn(5, heads, head_dim, generator=generator)
    tables = torch.randperm(num_blocks, generator=generator)[: 5 * max_blocks].view(5, max_blocks).int()
    lengths = torch.tensor([1, 5, 17, 32, 9], dtype=torch.int32)
    return [t.to(device, dtype) for t in (q, k_cache, v_cache)] + [tables.to(device), lengths.to(device)]


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("group", [(6, 2), (4, 4), (8, 1)], ids=["gqa", "mha", "mqa"])
def test_paged_decode_torch_matches_the_oracle(window, group):
    q, k, v, tables, lengths = paged_case("cpu", torch.float32, *group)
    out = torch.empty_like(q)
    paged_decode_torch(out, q, k, v, tables, lengths, 4, 0.3, window)
    torch.testing.assert_close(out, naive_decode_attention(q, k, v, tables, lengths, 4, 0.3, window), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("layout", [(6, 2, 40, 4), (8, 1, 64, 16), (4, 4, 16, 32)], ids=["gqa", "mqa", "mha"])
def test_paged_decode_triton_matches_the_oracle(triton, window, layout):
    heads, kv_heads, head_dim, block_size = layout
    q, k, v, tables, lengths = paged_case(triton.device, torch.float32, heads, kv_heads, head_dim,
                                          block_size)
    out = torch.empty_like(q)
    custom_ops.paged_decode(out, q, k, v, tables, lengths, block_size, 0.3, window)  # the op the engine calls
    expected = naive_decode_attention(*(t.cpu() for t in (q, k, v, tables, lengths)), block_size, 0.3, window)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_paged_decode_triton_bf16(triton):
    if triton.device != "cuda":
        pytest.skip("bf16 needs the compiled kernel: the interpreter computes through numpy")
    q, k, v, tables, lengths = paged_case("cuda", torch.bfloat16)
    out = torch.empty_like(q)
    custom_ops.paged_decode(out, q, k, v, tables, lengths, 4, 0.3, 0)
    expected = naive_decode_attention(*(t.cpu() for t in (q, k, v, tables, lengths)), 4, 0.3, 0)
    torch.testing.assert_close(out.cpu().float(), expected, rtol=2e-2, atol=2e-2)
