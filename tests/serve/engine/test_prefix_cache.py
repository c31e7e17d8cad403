"""Prefix caching: full KV blocks shared between requests of the same model, salt and leading tokens, and never
between others.

The block allocator and the scheduler alone first (no model); then the engine on the tiny llama, where every answer
that read cached blocks must still equal PEFT's (or HF's, on the base model) for the prompt alone: hits, isolation
between adapters and the base, adapters replaced, reloaded and read again, eviction under memory pressure,
preemption, prompt log-probabilities. About 10 s.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from lora_workload import ADAPTERS, write_adapters
from support import CPU, hf_greedy, peft_greedy, start_engine

from loradock.serve.engine import Engine, EngineConfig, SamplingParams
from loradock.serve.engine.block_allocator import BlockAllocator
from loradock.serve.engine.graph_runner import EagerGraph
from loradock.serve.engine.kv_cache import CacheShape, PagedKVCache
from loradock.serve.engine.request import Request
from loradock.serve.engine.scheduler import Scheduler
from loradock.serve.models.loader import load_model

SHAPE = CacheShape(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32)
MAX_NEW = 8
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0)


# ---- the allocator and the scheduler ------------------------------------------------------------------------


def test_freed_blocks_stay_findable_until_allocation_needs_them_tail_first():
    allocator = BlockAllocator(3)
    blocks = allocator.allocate(3)
    allocator.register(blocks[0], b"h0")
    allocator.register(blocks[1], b"h1")
    allocator.free(blocks)
    assert allocator.num_free == 3 and allocator.num_cached_free == 2
    assert allocator.find([b"h0", b"h1", b"h2"]) == blocks[:2]
    assert allocator.allocate(1) == [blocks[2]]  # the unhashed block goes first
    assert allocator.find([b"h0", b"h1"]) == blocks[:2]
    assert allocator.allocate(1) == [blocks[1]]  # then the tail of the prefix: its head stays findable
    assert allocator.find([b"h0", b"h1"]) == blocks[:1]
    allocator.share(blocks[:1])  # found and held: no longer free
    assert allocator.num_free == 0 and allocator.refs == [1, 1, 1]


def test_a_block_registered_twice_keeps_the_first():
    allocator = BlockAllocator(2)
    first, second = allocator.allocate(2)
    allocator.register(first, b"h")
    allocator.register(second, b"h")  # computed again beside the first: a duplicate
    allocator.free([first, second])
    assert allocator.find([b"h"]) == [first] and allocator.num_cached_free == 1


def make_request(name: str, prompt: list[int], client: str = "", salt: str | None = None) -> Request:
    return Request(request_id=name, prompt_ids=prompt, params=SamplingParams(), generator=None, client=client,
                   cache_salt=salt)


def run_step(scheduler: Scheduler, entries, token: int = 7) -> None:
    """What the engine does after the forward pass: advance, append a token when due."""
    scheduler.advance(entries)
    for request, _ in entries:
        if request.num_computed == request.num_tokens:
            request.output_ids.append(token)


def scheduler_with(num_blocks: int = 32, **options) -> Scheduler:
    cache = PagedKVCache(SHAPE, num_blocks=num_blocks, block_size=4, device=CPU)
    return Scheduler(cache, max_batch_tokens=64, max_num_seqs=8, **options)


PROMPT = list(range(10, 20))  # ten tokens: two full blocks of four


def test_a_request_takes_the_cached_full_blocks_and_computes_the_rest():
    scheduler = scheduler_with()
    first = make_request("first", PROMPT)
    scheduler.add(first)
    run_step(scheduler, scheduler.schedule())
    blocks = first.blocks[:2]
    scheduler.remove(first)
    again, longer, exact = make_request("again", PROMPT), make_request("longer", PROMPT + [1, 2]), \
        make_request("exact", PROMPT[:8])
    for request in (again, longer, exact):
        scheduler.add(request)
    step = scheduler.schedule()
    assert [(r.request_id, n) for r, n in step] == [("again", 2), ("longer", 4), ("exact", 4)]
    assert again.blocks[:2] == longer.blocks[:2] == blocks
    assert [scheduler.cache.allocator.refs[b] for b in blocks] == [3, 2]
    # "exact" is two whole blocks: the second holds its last token, whose logits must be computed
    assert exact.blocks[:1] == blocks[:1] and exact.blocks[1] != blocks[1]
    assert (again.num_cached_tokens, longer.num_cached_tokens, exact.num_cached_tokens) == (8, 8, 4)
    assert (scheduler.prefix.queries, scheduler.prefix.hits) == (10 + 10 + 12 + 8, 8 + 8 + 4)


def test_salt_and_model_separate_and_caching_off_finds_nothing():
    for caching, salt, found in ((True, None, 8), (True, "other", 0), (False, None, 0)):
        scheduler = scheduler_with(prefix_caching=caching)
        first = make_request("first", PROMPT)
        scheduler.add(first)
        run_step(scheduler, scheduler.schedule())
        second = make_request("second", PROMPT, salt=salt)
        scheduler.add(second)
        scheduler.schedule()
        assert second.num_cached_tokens == found


def test_fair_share_charges_only_the_prompt_tokens_computed():
    def service(caching: bool) -> float:
        """A client's counter after two requests with one prompt: the second is admitted after the first ran."""
        scheduler = scheduler_with(policy="fair", prefix_caching=caching)
        first, second = make_request("first", PROMPT, client="c"), make_request("second", PROMPT, client="c")
        scheduler.add(first)
        run_step(scheduler, scheduler.schedule())
        scheduler.add(second)
        scheduler.schedule()
        return scheduler.policy.counters["c"]

    # each prompt's 10 tokens, three output tokens at 2 (first's two, second's first): the second found 8 cached
    assert (service(False), service(True)) == (10 + 10 + 3 * 2, 10 + 2 + 3 * 2)


def test_shared_blocks_outlive_a_preempted_or_paused_holder_and_are_found_again():
    scheduler = scheduler_with(num_blocks=6)
    a, b = make_request("a", PROMPT), make_request("b", PROMPT)
    scheduler.add(a)
    run_step(scheduler, scheduler.schedule())  # a: 3 blocks, two of them full and findable
    scheduler.add(b)
    run_step(scheduler, scheduler.schedule())  # b shares them and adds its own third
    shared = a.blocks[:2]
    assert b.blocks[:2] == shared and [scheduler.cache.allocator.refs[x] for x in shared] == [2, 2]
    scheduler._preempt(b)  # b's blocks back: the shared ones still held by a
    assert [scheduler.cache.allocator.refs[x] for x in shared] == [1, 1] and b.blocks == []
    step = scheduler.schedule()  # b's recompute finds them again, and its own output block beside
    assert (b, 3) in step and b.blocks[:2] == shared
    run_step(scheduler, step)
    scheduler._pause(b)  # paused: b keeps its blocks
    scheduler._drop_paused_blocks()  # until the cache runs dry
    assert b.blocks == [] and [scheduler.cache.allocator.refs[x] for x in shared] == [1, 1]
    scheduler.remove(a)
    scheduler.remove(b)
    assert sum(scheduler.cache.allocator.refs) == 0 and scheduler.cache.allocator.num_free == 6


# ---- the engine: answers stay PEFT's --------------------------------------------------------------------------


def ordinary_ids(tokenizer, count: int, seed: int) -> list[int]:
    specials = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in specials])
    return ordinary[torch.randint(len(ordinary), (count,), generator=torch.Generator().manual_seed(seed))].tolist()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Four prompts sharing their first 37 tokens (four full blocks of eight), with different endings. The third has
    49 tokens: when all of it is cached, its last token alone runs, as a decode."""
    prefix = [tokenizer.bos_token_id] + ordinary_ids(tokenizer, 36, seed=1)
    return [prefix + ordinary_ids(tokenizer, n, seed=10 + i) for i, n in enumerate((5, 8, 12, 14))]


async def answer(engine, prompt, adapter=None, salt=None, params=GREEDY) -> tuple[list[int], int | None]:
    """A request's token ids and the prompt tokens it found cached."""
    ids, cached = [], None
    async for output in engine.generate(prompt, params, adapter=adapter, cache_salt=salt):
        ids.append(output.token_id)
        cached = output.cached_tokens if output.cached_tokens is not None else cached
    return ids, cached


def ask(engine, prompt, adapter=None, salt=None) -> tuple[list[int], int | None]:
    return asyncio.run(answer(engine, prompt, adapter, salt))


def ask_together(engine, prompts, adapter=None) -> list[tuple[list[int], int | None]]:
    async def main():
        return await asyncio.gather(*(answer(engine, p, adapter) for p in prompts))

    return asyncio.run(main())


def test_hits_give_peft_tokens_and_each_model_its_own_blocks(model_dir, adapter_dir, prompts):
    """The same prompts on adapter a, then b, then the base, then a again: each model finds only blocks it computed
    itself, and every answer is its model's own."""
    path = model_dir("llama")
    a, b = list(ADAPTERS)[:2]
    oracle = {name: peft_greedy(path, adapter_dir / name if name else None, prompts, MAX_NEW) for name in (a, b, None)}
    assert oracle[a] != oracle[b] != oracle[None]
    engine = start_engine(path, adapters_dir=str(adapter_dir), max_gpu_adapters=2, block_size=8)
    try:
        first, *rest = prompts
        assert ask(engine, first, a) == (oracle[a][0], 0)
        assert ask_together(engine, rest, a) == [(ids, 32) for ids in oracle[a][1:]]
        for name in (b, None):  # a's blocks are not b's nor the base's: the first finds nothing, the rest its own
            results = [ask(engine, p, name) for p in prompts]
            assert results == [(oracle[name][0], 0)] + [(ids, 32) for ids in oracle[name][1:]]
        # each prompt of a now whole in the cache: every full block but the one of its last token is found
        assert ask_together(engine, prompts, a) == [(ids, (len(p) - 1) // 8 * 8) for ids, p in zip(oracle[a], prompts)]
    finally:
        engine.shutdown()
    assert sum(engine.cache.allocator.refs) == 0 and engine.cache.allocator.num_cached_free > 0


def test_replaced_reloaded_or_reread_adapters_never_see_old_blocks(model_dir, adapter_dir, prompts, tmp_path):
    """One name, other weights each time: replaced by the admin API, unloaded and loaded again (its version number
    starts again at 1), and its files changed on disk then read again after eviction."""
    path = model_dir("llama")
    a, b = list(ADAPTERS)[:2]
    oracle = {name: peft_greedy(path, adapter_dir / name, prompts[:1], MAX_NEW)[0] for name in (a, b)}
    engine = start_engine(path, max_gpu_adapters=1, max_cpu_adapters=1, block_size=8)

    async def load(name, source, replace=False):
        await engine.load_adapter(name, source, replace=replace)

    try:
        asyncio.run(load("x", adapter_dir / a))
        assert ask(engine, prompts[0], "x") == (oracle[a], 0)
        assert ask(engine, prompts[0], "x") == (oracle[a], (len(prompts[0]) - 1) // 8 * 8)
        asyncio.run(load("x", adapter_dir / b, replace=True))
        assert ask(engine, prompts[0], "x") == (oracle[b], 0)
        engine.unregister_adapter("x")
        asyncio.run(load("x", adapter_dir / a))
        assert engine.resolve_adapter("x").version == 1
        assert ask(engine, prompts[0], "x") == (oracle[a], 0)
        # Read from a folder; evicted from the host and the device by another adapter; its files changed; read again.
        folder = tmp_path / "changing"
        shutil.copytree(adapter_dir / a, folder)
        engine.register_adapter("y", folder)
        assert ask(engine, prompts[0], "y") == (oracle[a], 0)
        assert ask(engine, prompts[0], "x")[0] == oracle[a]
        shutil.rmtree(folder)
        shutil.copytree(adapter_dir / b, folder)
        assert ask(engine, prompts[0], "y") == (oracle[b], 0)
    finally:
        engine.shutdown()


def test_blocks_evicted_under_memory_pressure_are_never_served_stale(model_dir, tokenizer, prompts):
    """A cache of 12 blocks of 8 tokens; prompts of 41-51 tokens, many more than it holds, twice over."""
    path = model_dir("llama")
    others = [[tokenizer.bos_token_id] + ordinary_ids(tokenizer, 40 + i, seed=100 + i) for i in range(6)]
    workload = prompts + others + prompts[::-1] + others
    reference, _ = load_model(path, "none", torch.float32, CPU)
    expected = {tuple(p): hf_greedy(reference, p, MAX_NEW) for p in workload}
    engine = start_engine(path, block_size=8, kv_cache_memory=12 * 8 * 512)  # 512 bytes per token
    try:
        assert engine.cache.num_blocks == 12
        results = [ask(engine, p) for p in workload]
    finally:
        engine.shutdown()
    assert [ids for ids, _ in results] == [expected[tuple(p)] for p in workload]
    assert any(cached for _, cached in results[len(prompts) + len(others):]), "nothing was found again"
    assert not all(cached for _, cached in results[len(prompts) + len(others):]), "nothing was evicted"


def test_preemption_with_shared_blocks_keeps_answers_exact(model_dir, prompts):
    """Four requests sharing a prefix and growing long answers in a cache too small for all of them: they preempt
    one another, release shared blocks and find them again."""
    path = model_dir("llama")
    reference, _ = load_model(path, "none", torch.float32, CPU)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    expected = [hf_greedy(reference, p, 30, ignore_eos=True) for p in prompts]
    engine = start_engine(path, block_size=8, kv_cache_memory=18 * 8 * 512, max_batch_tokens=32)

    async def main():
        return await asyncio.gather(*(answer(engine, p, params=params) for p in prompts))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    assert [ids for ids, _ in results] == expected
    assert engine.scheduler.num_preemptions > 0
    assert sum(engine.cache.allocator.refs) == 0


def test_decode_steps_of_the_cuda_path_read_shared_blocks(model_dir, prompts):
    """The decode graphs' path (run eagerly on the CPU): their block tables list the shared blocks."""
    path = model_dir("llama")
    reference, tokenizer = load_model(path, "none", torch.float32, CPU)
    expected = [hf_greedy(reference, p, MAX_NEW) for p in prompts]
    model, _ = load_model(path, "none", torch.float32, CPU)
    config = EngineConfig(max_gpu_adapters=0, max_num_seqs=8, max_model_len=256, block_size=8)
    engine = Engine(model, tokenizer, config, CPU, decode_graph=EagerGraph)
    graphs, replays = engine.runner.decode_graphs, []
    replay = graphs.run
    graphs.run = lambda *args: replays.append(args) or replay(*args)
    engine.start()
    try:
        first = ask(engine, prompts[0])
        rest = ask_together(engine, prompts[1:])
    finally:
        engine.shutdown()
    assert [first, *rest] == [(expected[0], 0)] + [(ids, 32) for ids in expected[1:]]
    assert len(replays) >= 2 * (MAX_NEW - 2)  # the decode steps of both rounds came from the graphs


def test_prompt_logprobs_are_computed_as_without_the_cache(model_dir, prompts):
    engine = start_engine(model_dir("llama"), block_size=8)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)

    async def with_prompt_logprobs():
        outputs = [out async for out in engine.generate(prompts[0], params)]
        return outputs[0].prompt_logprobs, outputs[0].cached_tokens

    try:
        cold = asyncio.run(with_prompt_logprobs())
        assert ask(engine, prompts[0])[1] == 40  # its blocks are cached
        assert asyncio.run(with_prompt_logprobs()) == (cold[0], 0)
    finally:
        engine.shutdown()
