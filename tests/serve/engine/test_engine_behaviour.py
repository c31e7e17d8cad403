"""Sampling, stopping, cancellation and a full KV cache, through the running engine."""

from __future__ import annotations

import asyncio

import pytest
import torch
from support import CPU, collect, hf_greedy, start_engine, varied_prompts, wait_until

from loradock.serve.engine import PromptTooLong, RequestError, SamplingParams
from loradock.serve.models.loader import load_model


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = start_engine(model_dir("llama"), kv_cache_memory="8MiB")
    yield engine
    engine.shutdown()


def run(coro):
    return asyncio.run(coro)


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine, tokenizer):
    prompt = varied_prompts(tokenizer, 1, seed=3)[0]
    params = SamplingParams(max_tokens=24, temperature=1.3, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)

    async def alone_then_in_a_crowd():
        alone = await collect(engine, prompt, params)
        crowd = [collect(engine, p, params.model_copy(update={"seed": i})) for i, p in enumerate(varied_prompts(tokenizer, 8))]
        together, *others = await asyncio.gather(collect(engine, prompt, params), *crowd)
        other_seed = await collect(engine, prompt, params.model_copy(update={"seed": 99}))
        return alone, together, other_seed

    alone, together, other_seed = run(alone_then_in_a_crowd())
    assert alone[0] == together[0]
    assert alone[0] != other_seed[0]


def test_top_k_one_and_tiny_top_p_are_greedy(engine, tokenizer):
    prompt = varied_prompts(tokenizer, 1, seed=4)[0]
    greedy = run(collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)))[0]
    top_k = run(collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0.8, top_k=1, ignore_eos=True)))[0]
    top_p = run(collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0.8, top_p=1e-6, seed=1, ignore_eos=True)))[0]
    assert greedy == top_k == top_p


def test_max_tokens_gives_length(engine, tokenizer):
    ids, _text, reason = run(collect(engine, varied_prompts(tokenizer, 1)[0], SamplingParams(max_tokens=7, temperature=0)))
    assert len(ids) == 7 and reason == "length"


def test_stop_token_id_and_eos(engine, tokenizer):
    prompt = varied_prompts(tokenizer, 1, seed=5)[0]
    free = run(collect(engine, prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))[0]
    stop_at = free[4]
    first = free.index(stop_at)
    ids, _text, reason = run(collect(engine, prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at])))
    assert ids == free[: first + 1] and reason == "stop"
    # The same token declared EOS: generation stops on it, unless ignore_eos.
    engine_eos = engine.eos_token_ids
    engine.eos_token_ids = frozenset({stop_at})
    try:
        ids, _text, reason = run(collect(engine, prompt, SamplingParams(max_tokens=12, temperature=0)))
        assert ids == free[: first + 1] and reason == "stop"
        ids, _text, reason = run(collect(engine, prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
        assert ids == free and reason == "length"
    finally:
        engine.eos_token_ids = engine_eos


def test_stop_string_cuts_the_text_before_it(engine, tokenizer):
    prompt = varied_prompts(tokenizer, 1, seed=6)[0]
    _ids, text, _ = run(collect(engine, prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)))
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"need a visible stop string, got {stop!r} from {text!r}"
    _ids, cut, reason = run(collect(engine, prompt, SamplingParams(max_tokens=30, temperature=0, stop=[stop], ignore_eos=True)))
    assert reason == "stop"
    assert cut == text[: text.index(stop)]
    assert wait_until(lambda: engine.cache.allocator.num_free == engine.cache.num_blocks)


def test_streamed_text_equals_decoding_all_tokens(engine, tokenizer):
    prompt = tokenizer("Grüße aus Köln — naïve café, 東京 🚀").input_ids
    ids, text, _ = run(collect(engine, prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)))
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_cancelling_a_request_frees_its_kv_at_once(engine, tokenizer):
    prompt = varied_prompts(tokenizer, 1, seed=7)[0]

    async def read_three_then_close():
        stream = engine.generate(prompt, SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        got = [await anext(stream) for _ in range(3)]
        in_use = engine.cache.num_blocks - engine.cache.allocator.num_free
        await stream.aclose()
        return got, in_use

    got, in_use = run(read_three_then_close())
    assert len(got) == 3 and in_use > 0
    assert wait_until(lambda: engine.cache.allocator.num_free == engine.cache.num_blocks and not engine.scheduler.running)


def test_requests_wait_for_a_full_kv_cache_then_complete(model_dir, tokenizer):
    path = model_dir("llama")
    prompts = varied_prompts(tokenizer, 8, seed=8)
    max_new = 16
    need = sum(len(p) + max_new for p in prompts)
    # Room for 160 tokens: far less than the 8 requests need at once, more than any one needs.
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # k+v, layers, kv heads, head dim, fp32
    engine = start_engine(path, kv_cache_memory=160 * bytes_per_token, block_size=16)
    assert engine.cache.capacity_tokens == 160 < need

    async def all_at_once():
        params = SamplingParams(max_tokens=max_new, temperature=0)
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

    try:
        results = run(all_at_once())
    finally:
        engine.shutdown()
    reference, _ = load_model(path, "none", torch.float32, CPU)
    for prompt, (ids, _text, _reason) in zip(prompts, results):
        assert ids == hf_greedy(reference, prompt, max_new)
    assert engine.cache.allocator.num_free == engine.cache.num_blocks


def test_prompt_beyond_the_context_is_refused(engine):
    too_long = [5] * engine.max_model_len
    with pytest.raises(PromptTooLong):
        run(collect(engine, too_long, SamplingParams()))
    with pytest.raises(RequestError, match="max_tokens"):
        run(collect(engine, [5, 6, 7], SamplingParams(max_tokens=engine.max_model_len)))
    with pytest.raises(RequestError, match="token ids"):
        run(collect(engine, [5, 10**9], SamplingParams()))
    with pytest.raises(RequestError, match="empty"):
        run(collect(engine, [], SamplingParams()))
