"""The engine's CPU-only paths: the compiled decode attention against SDPA, and weights on huge pages."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import pytest
import torch
from support import CPU, collect, hf_greedy, start_engine, varied_prompts

from loradock.kernels.cpu_build import cpu_ops
from loradock.serve.engine.attention import paged_attention
from loradock.serve.engine.batch import build_step
from loradock.serve.engine.forward_context import ForwardContext
from loradock.serve.engine.host_memory import HUGE_PAGE, huge_page_buffer, pack_into_huge_pages
from loradock.serve.engine.kv_cache import CacheShape, PagedKVCache
from loradock.serve.engine.request import Request
from loradock.serve.engine.sampling import SamplingParams
from loradock.serve.models.loader import load_model


@pytest.fixture(scope="module")
def compiled():
    ops = cpu_ops()
    assert ops is not None, "the compiled CPU ops did not build: see the loradock.kernels warning"
    return ops


def cached_requests(lengths: list[int], cache: PagedKVCache, seed: int) -> list[Request]:
    """Requests whose first `length - 1` tokens sit in the cache (blocks handed out shuffled), one token pending."""
    rng = random.Random(seed)
    free = list(range(cache.num_blocks))
    rng.shuffle(free)
    requests = []
    for i, length in enumerate(lengths):
        request = Request(f"r{i}", [rng.randrange(5, 100) for _ in range(length)], SamplingParams(), None)
        request.blocks = [free.pop() for _ in range(cache.blocks_needed(length))]
        request.num_computed = length - 1
        requests.append(request)
    return requests


def filled_cache(num_kv_heads: int, head_dim: int, seed: int, dtype: torch.dtype = torch.float32) -> PagedKVCache:
    """A CPU cache of 1 layer with random keys and values; tests write NaN where nothing may be read."""
    cache = PagedKVCache(CacheShape(1, num_kv_heads, head_dim, dtype), num_blocks=24, block_size=8, device=CPU)
    generator = torch.Generator().manual_seed(seed)
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=generator))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=generator))
    return cache


def reference_decode(query, cache, requests, scale, window):
    """Each request's one query against its own cached context, written out with plain torch ops."""
    out = []
    for b, request in enumerate(requests):
        position = request.num_computed
        first = 0 if window is None else max(0, position - window + 1)
        slots = [request.blocks[p // 8] * 8 + p % 8 for p in range(first, position + 1)]
        keys, values = cache.keys[0][slots], cache.values[0][slots]  # [L, Hkv, D]
        group = query.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # [L, H, D]
        weights = torch.softmax(torch.einsum("hd,lhd->hl", query[b].float(), keys.float()) * scale, dim=-1)
        out.append(torch.einsum("hl,lhd->hd", weights, values.float()))
    return torch.stack(out)  # [B, H, D] float32


def eager_context(cache: PagedKVCache, step) -> ForwardContext:
    """The forward context as an eager forward of `step` sets it."""
    context = ForwardContext(cache, lora=None)
    context.attention = step.attention
    return context


def decode_step_attention(compiled, dtype, heads, kv_heads, head_dim, window, threads):
    """One decode step of seven sequences (1 to 64 tokens) through `paged_attention` with the compiled kernel, in
    `dtype`: (what it attended [T, H, D], the written-out attention in float32 on the same values)."""
    cache = filled_cache(kv_heads, head_dim, seed=heads, dtype=dtype)
    requests = cached_requests([1, 2, 9, 17, 40, 64, 3], cache, seed=head_dim)
    calls = []

    def kernel(*args):
        calls.append(args)
        return compiled.cached_attention(*args)

    step = build_step([(r, 1) for r in requests], cache, CPU, kernel)
    used = {r.blocks[p // 8] * 8 + p % 8 for r in requests for p in range(r.num_tokens)}
    unused = torch.tensor(sorted(set(range(cache.capacity_tokens)) - used))
    cache.keys[0][unused] = float("nan")  # slots of no request: never read
    cache.values[0][unused] = float("nan")
    T = len(requests)
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, h, T, head_dim, generator=generator).to(dtype)  # as HF passes: [1, H, T, D]
                         for h in (heads, kv_heads, kv_heads))
    module = torch.nn.Module()
    module.layer_idx = 0
    scale = head_dim**-0.5

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        attended, _ = paged_attention(
            module, query, key, value, None, scaling=scale, sliding_window=window,
            loradock_context=eager_context(cache, step),
        )  # also writes this step's key and value into the cache
    finally:
        torch.set_num_threads(previous)
    assert len(calls) == 1  # the compiled kernel attended, not SDPA
    return attended[0], reference_decode(query[0].transpose(0, 1), cache, requests, scale, window)


# head dims of 64 and 128 take the AVX-512 loops where the CPU has them (keys in blocks of 16, so 1 to 64 tokens end
# blocks short and full; a value row's slice in registers for up to four heads of a kv head: groups of 1, 2, 4, 7)
VECTOR_LAYOUTS = [(4, 2, 64), (5, 5, 64), (7, 1, 64), (8, 2, 128)]


@pytest.mark.parametrize("threads", [1, 2])  # 1: the helper thread runs work items too; 2: torch's threads do
@pytest.mark.parametrize("heads,kv_heads,head_dim", [*VECTOR_LAYOUTS, (4, 4, 32), (6, 3, 40), (10, 5, 16), (6, 1, 24)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_matches_the_written_out_attention(compiled, heads, kv_heads, head_dim, window, threads):
    attended, expected = decode_step_attention(compiled, torch.float32, heads, kv_heads, head_dim, window, threads)
    torch.testing.assert_close(attended, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [*VECTOR_LAYOUTS, (6, 3, 40), (6, 1, 24)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_reads_a_bfloat16_cache(compiled, heads, kv_heads, head_dim, window, threads):
    # scores, softmax and the sum of values in float32, the output rounded once: within one bfloat16 rounding
    # (2^-8 of the value) of the float32 attention over the same bfloat16 queries, keys and values
    attended, expected = decode_step_attention(compiled, torch.bfloat16, heads, kv_heads, head_dim, window, threads)
    assert attended.dtype == torch.bfloat16
    torch.testing.assert_close(attended.float(), expected, rtol=2**-7, atol=1e-4)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("window", [None, 6])
def test_the_compiled_attention_and_sdpa_give_the_same_mixed_step(compiled, dtype, tolerance, head_dim, window):
    """A step of decodes and two prefill chunks (one a whole prompt, one a tail after 8 cached tokens): the compiled
    kernel takes every group, each chunk's tokens masked by their own positions; SDPA over gathered copies agrees."""
    outputs = []
    for kernel in (compiled.cached_attention, None):
        calls = []
        cache = filled_cache(2, head_dim, seed=7, dtype=dtype)
        decodes = cached_requests([5, 30, 12], cache, seed=3)
        free = [b for b in range(cache.num_blocks) if all(b not in r.blocks for r in decodes)]
        prefill = Request("p", list(range(10, 30)), SamplingParams(), None)
        prefill.blocks = free[:3]
        tail = Request("t", list(range(40, 61)), SamplingParams(), None)
        tail.blocks, tail.num_computed = free[3:6], 8  # its first block's keys and values are in the cache
        step = build_step([(prefill, 20), (tail, 13), *[(r, 1) for r in decodes]], cache, CPU,
                          kernel and (lambda *args: calls.append(args) or kernel(*args)))
        assert len(step.attention.groups) == 3
        generator = torch.Generator().manual_seed(2)
        query, key, value = (torch.randn(1, heads, 36, head_dim, generator=generator).to(dtype) for heads in (4, 2, 2))
        module = torch.nn.Module()
        module.layer_idx = 0
        context = eager_context(cache, step)
        outputs.append(paged_attention(module, query, key, value, None, scaling=0.25, sliding_window=window,
                                       loradock_context=context)[0].float())
        assert len(calls) == (3 if kernel else 0)  # a call per group
    torch.testing.assert_close(outputs[0], outputs[1], rtol=tolerance, atol=tolerance)


def test_decode_attention_refuses_positions_outside_the_context(compiled):
    cache = filled_cache(2, 16, seed=1)
    out = torch.empty(1, 4, 16)
    with pytest.raises(RuntimeError, match="query position"):
        compiled.cached_attention(
            out, torch.randn(1, 4, 16), cache.keys[0], cache.values[0], torch.zeros(1, 4, dtype=torch.long),
            torch.tensor([4]), 0.25, 0,
        )


def test_engine_greedy_equals_hf_with_and_without_the_compiled_attention(model_dir, tokenizer):
    path = model_dir("llama")
    prompts = varied_prompts(tokenizer, 6, seed=11)
    reference, _ = load_model(path, "none", torch.float32, CPU)
    expected = [hf_greedy(reference, p, 12, ignore_eos=True) for p in prompts]
    for compiled_attention in (True, False):
        engine = start_engine(path)
        assert engine.runner.attention_kernel is not None  # the CPU engine's default
        if not compiled_attention:
            engine.runner.attention_kernel = None  # SDPA for every group
        try:
            got = engine_greedy(engine, prompts, 12)
        finally:
            engine.shutdown()
        assert got == expected


def engine_greedy(engine, prompts, max_tokens):
    async def all_together():
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

    return [ids for ids, _text, _reason in asyncio.run(all_together())]


# ---------------------------------------------------------------------------------------------- huge pages


def thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    found = re.search(r"\[(\w+)\]", path.read_text()) if path.exists() else None
    return found.group(1) if found else "unsupported"


def smaps_field(address: int, field: str) -> int:
    """A field of the mapping holding `address` in /proc/self/smaps (THPeligible: 0 or 1; Rss: kB); 0 if absent.
    The kernel merges neighbouring anonymous mappings: read changes in Rss, not its value."""
    value, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        header = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if header:
            inside = int(header.group(1), 16) <= address < int(header.group(2), 16)
        elif inside and line.startswith(f"{field}:"):
            value = int(line.split()[1])
    return value


def huge_page_eligible(address: int) -> bool:
    """Whether the kernel lets the mapping holding `address` use transparent huge pages."""
    return smaps_field(address, "THPeligible") == 1


def test_huge_page_buffer_is_aligned_zeroed_and_advised():
    buffer = huge_page_buffer(3 * HUGE_PAGE + 100)
    assert buffer.dtype == torch.uint8 and buffer.numel() == 3 * HUGE_PAGE + 100
    assert buffer.data_ptr() % HUGE_PAGE == 0
    assert not buffer.any()
    buffer.fill_(7)  # writable: the pages are committed now
    if thp_mode() in ("always", "madvise"):
        assert huge_page_eligible(buffer.data_ptr())


def test_an_idle_cpu_cache_commits_fresh_memory_as_far_ahead_as_a_busy_stretch_took():
    # 1 KiB a token in each of the 4 tensors (2 layers' keys and values): a piece (2 MiB) is 2048 slots
    shape = CacheShape(num_layers=2, num_kv_heads=4, head_dim=64, dtype=torch.float32)
    cache = PagedKVCache(shape, num_blocks=1024, block_size=16, device=CPU, commit_ahead_bytes=8 << 20)
    tensors = [*cache.keys, *cache.values]

    def resident() -> int:  # bytes of the cache's mapping the kernel has committed
        return smaps_field(cache.keys[0].data_ptr(), "Rss") << 10

    def commit_all() -> int:  # pieces committed until there are none left
        return sum(iter(cache.commit_ahead, False))

    start = resident()
    assert commit_all() == 0 and resident() == start  # nothing used: nothing to commit
    blocks = cache.allocator.allocate(300)  # slots [0, 4800)
    for tensor in tensors:
        tensor[:160] = 1.0  # requests' keys and values in the first 10 blocks
    before = resident()
    assert commit_all() == 4  # 4800 slots taken, 2048 (8 MiB over the 4 tensors) ahead: one piece in each
    assert 8 << 20 <= resident() - before <= (8 << 20) + 4 * HUGE_PAGE  # the kernel rounds up to its page
    cache.allocator.free(blocks)
    cache.allocator.allocate(300)  # the same blocks again: nothing fresh taken, nothing more to commit
    assert commit_all() == 0
    cache.allocator.allocate(100)  # [4800, 6400): fresh blocks, already committed; commit on to 6400 + 2048
    assert commit_all() == 4
    assert all(t[:160].eq(1).all() and not t[160:].any() for t in tensors)  # what was written stays, the rest zeros


def test_packing_keeps_values_ties_and_strides():
    model = torch.nn.Sequential(
        torch.nn.Linear(300, 700), torch.nn.Linear(700, 300, bias=False), torch.nn.Linear(300, 700, bias=False)
    )
    model[1].weight = torch.nn.Parameter(model[0].weight.t())  # a transposed view sharing model[0]'s storage
    model[2].weight = model[0].weight  # tied: the same parameter in two modules
    model.register_buffer("table", torch.arange(10.0).view(2, 5).t())  # a non-contiguous buffer
    x = torch.randn(3, 300)
    expected = model(x)
    weight = model[0].weight

    moved = pack_into_huge_pages(model)

    assert moved >= (300 * 700 + 700 + 10) * 4
    assert model[0].weight is weight  # the same parameter object, its data moved
    assert model[1].weight.data_ptr() == model[0].weight.data_ptr() and model[1].weight.stride() == (1, 300)
    assert model[2].weight is model[0].weight
    assert model.table.stride() == (1, 5) and model.table.equal(torch.arange(10.0).view(2, 5).t())
    assert model[0].weight.data_ptr() % HUGE_PAGE == 0
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_packing_leaves_modules_of_other_tensor_kinds_alone():
    model = torch.nn.Linear(4, 4).to(torch.device("meta"))
    assert pack_into_huge_pages(model) == 0


def test_the_cpu_engine_keeps_weights_adapters_and_kv_cache_on_huge_pages(model_dir, tokenizer):
    engine = start_engine(model_dir("llama"), max_gpu_adapters=2, max_lora_rank=8)
    try:
        model = engine.runner.model
        tensors = [*model.parameters(), *model.buffers()]
        start = min(t.data_ptr() for t in tensors)
        assert start % HUGE_PAGE == 0
        packed_size = sum(t.untyped_storage().nbytes() + 64 for t in tensors)
        assert all(start <= t.data_ptr() < start + packed_size for t in tensors)  # all in the one buffer
        assert any("lora_A" in name for name, _ in model.named_buffers())  # the slot buffers moved with the rest
        assert engine.cache.keys[0].data_ptr() % HUGE_PAGE == 0
        if thp_mode() in ("always", "madvise"):
            assert huge_page_eligible(start) and huge_page_eligible(engine.cache.keys[0].data_ptr())
        prompt = varied_prompts(tokenizer, 1, seed=2)[0]
        reference, _ = load_model(model_dir("llama"), "none", torch.float32, CPU)
        assert engine_greedy(engine, [prompt], 8) == [hf_greedy(reference, prompt, 8, ignore_eos=True)]
    finally:
        engine.shutdown()
