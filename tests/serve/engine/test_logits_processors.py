"""Logits processors (logit_bias, repetition/frequency/presence penalties, min_tokens): on their own against Hugging
Face's processors and OpenAI's formula, and through the running engine against HF generate."""

from __future__ import annotations

import asyncio

import pydantic
import pytest
import torch
from support import CPU, collect, start_engine, varied_prompts
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GenerationConfig, RepetitionPenaltyLogitsProcessor

from loradock.serve.engine import Engine, EngineConfig, RequestError, SamplingParams
from loradock.serve.engine.logits_processors import process_logits
from loradock.serve.engine.request import Request
from loradock.serve.models.loader import load_model

VOCAB = 2048  # the tiny models' vocabulary
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def request(prompt_ids, output_ids=(), **params) -> Request:
    return Request("r", list(prompt_ids), SamplingParams(**params), None, output_ids=list(output_ids))


def random_requests(count: int, seed: int, **params) -> list[Request]:
    """Requests with random prompts and outputs (repeats included) over a small id range, so tokens recur."""
    generator = torch.Generator().manual_seed(seed)

    def ids(length: int) -> list[int]:
        return torch.randint(64, (length,), generator=generator).tolist()

    return [request(ids(int(torch.randint(1, 20, (1,), generator=generator))), ids(i), **params) for i in range(count)]


def random_logits(rows: int, seed: int, dtype=torch.float32, device=CPU) -> torch.Tensor:
    return (torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 4).to(device, dtype)


# ---- the processors alone ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_repetition_penalty_equals_hugging_faces_processor(device):
    requests = random_requests(6, seed=1, repetition_penalty=1.7)
    requests[2] = request(requests[2].prompt_ids, requests[2].output_ids, repetition_penalty=0.6)  # < 1 favours
    requests[4] = request(requests[4].prompt_ids, requests[4].output_ids)  # no penalty: row unchanged
    logits = random_logits(6, seed=2, device=device)
    expected = torch.cat([  # each row alone through HF's processor
        RepetitionPenaltyLogitsProcessor(r.params.repetition_penalty)(torch.tensor([r.all_ids], device=device),
                                                                      row[None])
        for r, row in zip(requests, logits)
    ])
    process_logits(logits, requests, frozenset())
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_frequency_and_presence_follow_openais_formula(device):
    requests = random_requests(5, seed=3, frequency_penalty=0.7, presence_penalty=-1.2)
    logits = random_logits(5, seed=4, device=device)
    expected = logits.cpu().clone()
    for row, r in enumerate(requests):
        for token in range(VOCAB):
            count = r.output_ids.count(token)  # output tokens only: the prompt does not count
            expected[row, token] -= count * 0.7 + (count > 0) * -1.2
    process_logits(logits, requests, frozenset())
    torch.testing.assert_close(logits.cpu(), expected)


def test_logit_bias_is_added_before_the_repetition_penalty_as_in_hugging_face():
    # HF generate runs its sequence bias before the repetition penalty; vLLM's order gives the same logits
    r = request([5, 6], [7], logit_bias=((5, 3.0), (9, -4.5)), repetition_penalty=2.0)
    logits = random_logits(1, seed=5)
    expected = logits.clone()
    expected[0, 5] += 3.0
    expected[0, 9] -= 4.5
    expected = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([r.all_ids]), expected)
    process_logits(logits, [r], frozenset())
    assert torch.equal(logits, expected)


def test_min_tokens_bars_stop_ids_and_eos_until_reached():
    eos = frozenset({1, 2})
    short = request([5], [7], min_tokens=3, stop_token_ids=(11,))
    ignoring = request([5], [7], min_tokens=3, stop_token_ids=(11,), ignore_eos=True)  # EOS is an ordinary token
    reached = request([5], [7, 8, 9], min_tokens=3, stop_token_ids=(11,))
    logits = random_logits(3, seed=6)
    untouched = logits.clone()
    process_logits(logits, [short, ignoring, reached], eos)
    assert logits[0].isinf().nonzero().flatten().tolist() == [1, 2, 11]
    assert logits[1].isinf().nonzero().flatten().tolist() == [11]
    assert torch.equal(logits[2], untouched[2])
    assert (logits[:2] == float("-inf")).sum() == 4


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_bf16_logits_are_processed_in_fp32_and_stay_bf16(device):
    requests = random_requests(4, seed=7, repetition_penalty=1.3, frequency_penalty=0.4, logit_bias=((3, 1.5),))
    logits = random_logits(4, seed=8, dtype=torch.bfloat16, device=device)
    in_fp32 = logits.float()
    process_logits(logits, requests, frozenset())
    process_logits(in_fp32, requests, frozenset())
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, in_fp32.to(torch.bfloat16))


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_rows_that_ask_nothing_cost_no_tensor_work():
    plain = [request([5], [7]), request([5], [7, 8], min_tokens=2, stop_token_ids=(11,)), request([6], temperature=0)]
    logits = random_logits(3, seed=9)
    untouched = logits.clone()
    with OpCounter() as counter:
        process_logits(logits, plain, frozenset({1}))
    assert counter.ops == [] and torch.equal(logits, untouched)


def test_logit_bias_is_validated():
    SamplingParams(logit_bias=tuple((t, 100.0 - t * 200 / 299) for t in range(300)))  # the limits themselves pass
    for bad in [((1, 100.5),), ((-1, 1.0),), ((1, 1.0), (1, 2.0)), tuple((t, 1.0) for t in range(301)),
                ((1, float("nan")),)]:
        with pytest.raises(pydantic.ValidationError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


# ---- through the engine --------------------------------------------------------------------------------------------

MAX_NEW = 16


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = start_engine(model_dir("llama"), kv_cache_memory="8MiB")
    yield engine
    engine.shutdown()


def run(coro):
    return asyncio.run(coro)


def greedy(**params) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True, **params)


def hf_generate(model, prompt_ids: list[int], **generation) -> list[int]:
    """HF generate, greedy, EOS ignored, one request alone."""
    config = GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0, **generation)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), generation_config=config)
    return out[0, len(prompt_ids) :].tolist()


def test_repetition_penalty_greedy_equals_hf_generate(engine, model_dir, tokenizer):
    prompts = varied_prompts(tokenizer, 6, seed=10)

    async def together():
        return await asyncio.gather(*(collect(engine, p, greedy(repetition_penalty=1.3)) for p in prompts))

    results = run(together())
    reference, _ = load_model(model_dir("llama"), "none", torch.float32, CPU)
    for prompt, (ids, _text, _reason) in zip(prompts, results):
        assert ids == hf_generate(reference, prompt, repetition_penalty=1.3)
    plain = [hf_generate(reference, p) for p in prompts]
    assert [ids for ids, _, _ in results] != plain, "the penalty changed nothing: the test cannot fail"


def test_logit_bias_forces_and_bans_a_token(engine, tokenizer):
    prompt = varied_prompts(tokenizer, 1, seed=11)[0]
    free = run(collect(engine, prompt, greedy()))[0]
    forced = run(collect(engine, prompt, greedy(logit_bias=((1000, 100.0),))))[0]
    banned = run(collect(engine, prompt, greedy(logit_bias=((free[0], -100.0),))))[0]
    assert forced == [1000] * MAX_NEW
    assert free[0] not in banned


def test_min_tokens_delays_a_stop_token_and_eos(engine, tokenizer):
    prompt = varied_prompts(tokenizer, 1, seed=12)[0]
    free = run(collect(engine, prompt, greedy()))[0]
    stop_at = free[1]
    first = free.index(stop_at)
    stopped = run(collect(engine, prompt, greedy(stop_token_ids=[stop_at])))[0]
    assert stopped == free[: first + 1]
    delayed, _text, _reason = run(collect(engine, prompt, greedy(stop_token_ids=[stop_at], min_tokens=6)))
    assert delayed[:first] == free[:first] and stop_at not in delayed[:6] and len(delayed) > 6
    engine_eos = engine.eos_token_ids
    engine.eos_token_ids = frozenset({stop_at})  # the same token as EOS
    try:
        as_eos = SamplingParams(max_tokens=MAX_NEW, temperature=0, min_tokens=6)
        assert run(collect(engine, prompt, as_eos))[0] == delayed
        # with ignore_eos the EOS token is an ordinary one: nothing to bar
        assert run(collect(engine, prompt, greedy(min_tokens=6)))[0] == free
    finally:
        engine.eos_token_ids = engine_eos


def test_min_tokens_delays_a_stop_string(engine, tokenizer):
    prompt = varied_prompts(tokenizer, 1, seed=12)[0]
    free, free_text, _ = run(collect(engine, prompt, greedy()))
    stop = free_text[:2]  # met within the first tokens
    assert stop.strip()
    stopped, text, reason = run(collect(engine, prompt, greedy(stop=[stop])))
    assert reason == "stop" and text == "" and len(stopped) < 6
    delayed, text, _ = run(collect(engine, prompt, greedy(stop=[stop], min_tokens=6)))
    assert len(delayed) >= 6 and delayed[:6] == free[:6] and text.startswith(stop)


def test_rows_without_processors_are_unaffected_by_a_row_with_them(engine, tokenizer):
    prompts = varied_prompts(tokenizer, 5, seed=13)
    asking = greedy(repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=0.5, logit_bias=((7, 3.0),),
                    min_tokens=4)

    async def mixed():
        others = (collect(engine, p, greedy()) for p in prompts[1:])
        return await asyncio.gather(collect(engine, prompts[0], asking), *others)

    solo = [run(collect(engine, prompts[0], asking))[0]] + [run(collect(engine, p, greedy()))[0] for p in prompts[1:]]
    assert [ids for ids, _, _ in run(mixed())] == solo


def test_out_of_vocabulary_logit_bias_is_refused(engine, tokenizer):
    prompt = varied_prompts(tokenizer, 1)[0]
    with pytest.raises(RequestError, match="logit_bias"):
        run(collect(engine, prompt, greedy(logit_bias=((engine.vocab_size, 1.0),))))


def test_a_bf16_engine_applies_them(model_dir, tokenizer):
    model, tok = load_model(model_dir("llama"), "none", torch.bfloat16, CPU)  # its logits are bf16
    prompt = varied_prompts(tokenizer, 1, seed=14)[0]
    with Engine(model, tok, EngineConfig(kv_cache_memory="8MiB"), CPU) as engine:
        free = run(collect(engine, prompt, greedy()))[0]
        banned = run(collect(engine, prompt, greedy(repetition_penalty=1.3, logit_bias=((free[0], -100.0),))))[0]
    assert len(banned) == MAX_NEW and free[0] not in banned
