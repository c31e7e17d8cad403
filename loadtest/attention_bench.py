"""The compiled CPU attention against the gather + SDPA path it replaced, on the shapes a serving step gives it:
decode tokens (one query per sequence over its cached context) and prefill chunks (a chunk's queries over the
cache, causal by position: a whole prompt, or the uncached tail of a prompt whose prefix was cached).

Both read the same paged cache (blocks of 16 slots in shuffled order, as a served cache holds them), at the serving
thread count (the kernel's helper thread takes the spare core where there is one); interleaved rounds, each round
one call of each in turn, medians over rounds. Printed per shape and dtype: ms per layer for each, their ratio,
GB/s of cache read (keys and values of every context once) and GFLOP/s, beside the machine's read bandwidth (a
sum over 256 MB). Shapes: the default model's attention (9 heads over 3 kv heads, head_dim 64) unless --heads.

    python -m loradock.loadtest.attention_bench [--dtype bfloat16|float32] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from ..kernels.cpu_build import cpu_ops
from ..serve.engine.attention import AttentionGroup, _sdpa
from ..serve.engine.threads import use_serving_threads
from .hardware import describe_hardware, format_hardware

BLOCK = 16
# (name, query tokens per sequence, sequences, context length at the last query)
SHAPES = (
    ("decode, 32 x 780 tokens", 1, 32, 780),
    ("decode, 4 x 780 tokens", 1, 4, 780),
    ("decode, 32 x 80 tokens", 1, 32, 80),
    ("prefill tail, 48 over 780", 48, 1, 780),
    ("prefill, whole 750-token prompt", 750, 1, 750),
)


def paged_case(queries: int, sequences: int, length: int, heads: int, kv_heads: int, head_dim: int,
               dtype: torch.dtype, generator: torch.Generator):
    """A cache holding `sequences` contexts of `length` tokens in shuffled blocks; the queries [T, H, D], one
    AttentionGroup per sequence (a decode group of all of them when queries == 1), as `batch.build_step` makes."""
    blocks_per = -(-length // BLOCK)
    order = torch.randperm(sequences * blocks_per, generator=generator)
    k_cache = torch.randn(sequences * blocks_per * BLOCK, kv_heads, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(k_cache.shape, generator=generator).to(dtype)
    tables = order.view(sequences, blocks_per)
    slots = (tables[:, :, None] * BLOCK + torch.arange(BLOCK)).view(sequences, -1)[:, :length].contiguous()  # [B, L]
    q = torch.randn(queries * sequences, heads, head_dim, generator=generator).to(dtype)
    positions = torch.arange(length - queries, length)
    if queries == 1:
        query_pos = torch.full((sequences, 1), length - 1)
        groups = [AttentionGroup(slice(0, sequences), slots, query_pos, torch.arange(length).expand(sequences, -1))]
    else:
        groups = [AttentionGroup(slice(b * queries, (b + 1) * queries), slots[b : b + 1], positions[None],
                                 torch.arange(length)[None]) for b in range(sequences)]
    return q, k_cache, v_cache, groups


def kernel_call(q, k_cache, v_cache, groups, scale) -> Callable[[], object]:
    kernel, out = cpu_ops().cached_attention, torch.empty_like(q)

    def run():
        for g in groups:
            positions = g.query_pos.view(-1)
            kernel(out[g.rows], q[g.rows], k_cache, v_cache, g.kv_index.expand(len(positions), -1), positions,
                   scale, 0)

    return run


def sdpa_call(q, k_cache, v_cache, groups, scale) -> Callable[[], object]:
    return lambda: [_sdpa(q, g, k_cache, v_cache, scale, None) for g in groups]


def read_bandwidth_gbs() -> float:
    """GB/s of summing 256 MB, best of five: what the cores can read from memory."""
    data = torch.ones(128 * 2**20, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(5):
        begin = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - begin)
    return data.numel() * 2 / best / 1e9


def bench(shape, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, rounds: int) -> str:
    name, queries, sequences, length = shape
    q, k_cache, v_cache, groups = paged_case(queries, sequences, length, heads, kv_heads, head_dim, dtype,
                                             torch.Generator().manual_seed(0))
    scale = head_dim**-0.5
    calls = {"kernel": kernel_call(q, k_cache, v_cache, groups, scale),
             "sdpa": sdpa_call(q, k_cache, v_cache, groups, scale)}
    times: dict[str, list[float]] = {label: [] for label in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()  # warm up
        for _ in range(rounds):
            for label, call in calls.items():
                begin = time.perf_counter()
                call()
                times[label].append(time.perf_counter() - begin)
    kernel_s, sdpa_s = (statistics.median(times[label]) for label in calls)
    # every query reads its context's keys and values: in bytes once per sequence (the kernel's queries of a chunk
    # share the reads through the caches), in FLOPs once per query (a causal chunk: query i sees its positions)
    context_bytes = sequences * length * kv_heads * head_dim * 2 * k_cache.element_size()
    keys_seen = sequences * sum(range(length - queries + 1, length + 1))
    flops = 4 * keys_seen * heads * head_dim
    return (f"{name:<32} {str(dtype).removeprefix('torch.'):<9} kernel {kernel_s * 1e3:8.3f} ms  SDPA "
            f"{sdpa_s * 1e3:8.3f} ms  SDPA/kernel {sdpa_s / kernel_s:5.2f}  kernel {context_bytes / kernel_s / 1e9:5.1f} "
            f"GB/s {flops / kernel_s / 1e9:6.1f} GFLOP/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.attention_bench",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], action="append",
                        help="repeatable (default: both)")
    parser.add_argument("--heads", default="9,3,64", help="HEADS,KV_HEADS,HEAD_DIM (default: the default model's)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    if cpu_ops() is None:
        raise SystemExit("the compiled CPU ops did not build on this machine: nothing to measure")
    use_serving_threads(None)
    heads, kv_heads, head_dim = (int(part) for part in args.heads.split(","))
    print(format_hardware(describe_hardware(torch.device("cpu"))))
    print(f"memory read: {read_bandwidth_gbs():.1f} GB/s; attention {heads}/{kv_heads} heads, head_dim {head_dim}; "
          f"{args.rounds} interleaved rounds, medians\n")
    for dtype in args.dtype or ["bfloat16", "float32"]:
        for shape in SHAPES:
            print(bench(shape, getattr(torch, dtype), heads, kv_heads, head_dim, args.rounds), flush=True)


if __name__ == "__main__":
    main()
