"""The scheduler alone: token budget, chunked prefill, admission order, preemption when the KV cache is dry."""

from __future__ import annotations

import torch

from loradock.serve.engine.block_allocator import BlockAllocator
from loradock.serve.engine.kv_cache import CacheShape, PagedKVCache, parse_size
from loradock.serve.engine.request import Request
from loradock.serve.engine.sampling import SamplingParams
from loradock.serve.engine.scheduler import Scheduler

SHAPE = CacheShape(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32)


def make_request(name: str, prompt_len: int) -> Request:
    return Request(request_id=name, prompt_ids=[1] * prompt_len, params=SamplingParams(), generator=None)


def run_step(entries, token: int = 7):
    """What the engine does after the forward pass: count computed tokens, append a token when due."""
    for request, n in entries:
        request.num_computed += n
        if request.num_computed == request.num_tokens:
            request.output_ids.append(token)


def test_decodes_first_then_prefill_chunks_within_the_budget():
    cache = PagedKVCache(SHAPE, num_blocks=64, block_size=4, device=torch.device("cpu"))
    scheduler = Scheduler(cache, max_batch_tokens=8, max_num_seqs=8)
    a, b = make_request("a", 5), make_request("b", 20)
    scheduler.add(a)
    scheduler.add(b)
    step = scheduler.schedule()
    assert [(r.request_id, n) for r, n in step] == [("a", 5), ("b", 3)]
    run_step(step)
    step = scheduler.schedule()
    assert [(r.request_id, n) for r, n in step] == [("a", 1), ("b", 7)]
    assert len(a.blocks) == 2 and len(b.blocks) == 3  # blocks follow the tokens, not the prompt


def test_admission_waits_for_blocks_and_preemption_frees_the_newest():
    cache = PagedKVCache(SHAPE, num_blocks=5, block_size=4, device=torch.device("cpu"))
    scheduler = Scheduler(cache, max_batch_tokens=64, max_num_seqs=8)
    assert scheduler.watermark_blocks == 1
    old, new, late = make_request("old", 8), make_request("new", 8), make_request("late", 3)
    for r in (old, new, late):
        scheduler.add(r)
    step = scheduler.schedule()
    assert [r.request_id for r, _ in step] == ["old", "new"]  # "late" waits: its block would eat the reserve
    run_step(step)
    # Both need a third block for their 9th token; one is left: the older gets it, the newest is preempted.
    step = scheduler.schedule()
    assert [r.request_id for r, _ in step] == ["old"]
    assert [r.request_id for r in scheduler.waiting] == ["new", "late"]
    assert new.num_computed == 0 and new.blocks == [] and new.output_ids == [7]
    assert scheduler.num_preemptions == 1
    scheduler.remove(old)
    assert cache.allocator.num_free == 5
    step = scheduler.schedule()
    assert [(r.request_id, n) for r, n in step] == [("new", 9), ("late", 3)]  # prompt + output recomputed


def test_block_allocator_and_sizes():
    allocator = BlockAllocator(3)
    taken = allocator.allocate(2)
    assert len(set(taken)) == 2 and allocator.num_free == 1
    allocator.free(taken)
    assert allocator.num_free == 3
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size(1024) == 1024
