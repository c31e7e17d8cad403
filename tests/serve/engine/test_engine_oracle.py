"""The engine's greedy output equals HF generate for each request alone, token for token (fp32, CPU)."""

from __future__ import annotations

import asyncio

import pytest

import torch
from support import ARCHITECTURES, CPU, collect, hf_greedy, start_engine, varied_prompts

from loradock.serve.engine import SamplingParams
from loradock.serve.models.loader import load_model

MAX_NEW = 12


async def run_staggered(engine, prompts, params):
    """All prompts in one running batch, arriving at different times."""
    return await asyncio.gather(*(collect(engine, p, params, delay=0.004 * i) for i, p in enumerate(prompts)))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_concurrent_greedy_equals_hf_generate(architecture, model_dir, tokenizer):
    path = model_dir(architecture)
    prompts = varied_prompts(tokenizer, 18)
    # A small step budget forces chunked prefills to share steps with decodes.
    engine = start_engine(path, max_batch_tokens=48, kv_cache_memory="8MiB")
    try:
        results = asyncio.run(run_staggered(engine, prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0)))
    finally:
        engine.shutdown()
    reference, _ = load_model(path, "none", torch.float32, CPU)
    for prompt, (ids, _text, _reason) in zip(prompts, results):
        assert ids == hf_greedy(reference, prompt, MAX_NEW)
    assert engine.steps < sum(len(p) for p in prompts) // 2, "requests did not share steps"
    assert engine.cache.allocator.num_free == engine.cache.num_blocks


def test_nf4_engine_equals_hf_generate_on_the_same_quantized_model(model_dir, tokenizer):
    path = model_dir("llama")
    prompts = varied_prompts(tokenizer, 16, seed=1)
    engine = start_engine(path, quantize="nf4", max_batch_tokens=64)
    try:
        results = asyncio.run(run_staggered(engine, prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0)))
    finally:
        engine.shutdown()
    assert type(engine.runner.model.model.layers[0].self_attn.q_proj.base).__name__ == "Linear4bit"
    reference, _ = load_model(path, "nf4", torch.float32, CPU)
    for prompt, (ids, _text, _reason) in zip(prompts, results):
        assert ids == hf_greedy(reference, prompt, MAX_NEW)


@pytest.mark.parametrize("budget,prefill_steps", [(None, 3), (2048, 1)])
def test_the_cpu_step_budget_chunks_a_long_prompt_and_keeps_hf_greedy(model_dir, tokenizer, budget, prefill_steps):
    # on the CPU the default budget is 512 tokens a step: a 1200-token prompt takes three steps before its first
    # token, and the chunks attend to what the earlier ones cached exactly as one pass does
    path = model_dir("llama")
    ids = [token for p in varied_prompts(tokenizer, 40) for token in p][:1200]
    assert len(ids) == 1200
    engine = start_engine(path, kv_cache_memory="8MiB", **({} if budget is None else {"max_batch_tokens": budget}))
    try:
        assert engine.max_batch_tokens == (budget or 512) == engine.scheduler.max_batch_tokens
        steps_before = engine.steps
        (got, _text, _reason), = asyncio.run(run_staggered(engine, [ids], SamplingParams(max_tokens=4, temperature=0)))
    finally:
        engine.shutdown()
    assert engine.steps - steps_before == prefill_steps + 3  # the prefill's steps, then a step per further token
    reference, _ = load_model(path, "none", torch.float32, CPU)
    assert got == hf_greedy(reference, ids, 4)
