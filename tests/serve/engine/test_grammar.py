"""Structured outputs through the running engine: every output under a guide matches it (on the tiny random model,
whose unguided output is gibberish), the mask changes nothing but the forbidden tokens, guided rows batch with
unguided rows and adapters, and survive preemption; bad guides and slow compiles are refused without delaying others.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import jsonschema
import pytest
import torch
from lora_workload import expected, mixed_workload
from support import CPU, collect, start_engine, varied_prompts, wait_until
from xgrammar import GrammarMatcher, allocate_token_bitmask

from loradock.serve.engine import Engine, EngineConfig, RequestError, SamplingParams
from loradock.serve.engine.grammar import GrammarError
from loradock.serve.engine.graph_runner import EagerGraph
from loradock.serve.engine.guide import MAX_GUIDE_CHARS, Guide
from loradock.serve.models.loader import load_model

SCHEMAS = {
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999}, "name": {"type": "string", "maxLength": 8}},
        "required": ["id", "name"]}}, "required": ["user"]},
    "int-array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1,
                  "maxItems": 4},
    "number": {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 100}},
               "required": ["price"]},
    "optional": {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"},
                                                  "c": {"type": "string", "maxLength": 5}}, "required": ["a"]},
    "pattern": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"]},
    "const": {"type": "object", "properties": {"version": {"const": 2}, "kind": {"const": "point"}},
              "required": ["version", "kind"]},
    "any-of": {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                                {"enum": ["none", "all"]}]}}, "required": ["v"]},
    "object-array": {"type": "array", "items": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 10}, "y": {"type": "integer", "minimum": 0, "maximum": 10}},
        "required": ["x", "y"]}, "maxItems": 3},
    "boolean": {"type": "boolean"},
    "mixed-enum": {"enum": [1, "two", None, True]},
    "string-length": {"type": "string", "minLength": 2, "maxLength": 6},
    "exclusive": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
    "nested-arrays": {"type": "array", "items": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                      "maxItems": 2},
    "refs": {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 3}},
                              "required": ["x"]}},
             "type": "object", "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
             "required": ["from", "to"]},
    "type-list": {"type": "object", "properties": {"n": {"type": ["integer", "null"], "minimum": 0, "maximum": 50},
                                                   "s": {"type": ["string", "null"], "maxLength": 6}},
                  "required": ["n", "s"]},
    "closed": {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                "count": {"type": "integer", "minimum": 0, "maximum": 3}},
               "required": ["ok", "count"], "additionalProperties": False},
    "date": {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"]},
    "pydantic": {"title": "Person", "type": "object", "additionalProperties": False,
                 "properties": {"name": {"title": "Name", "type": "string", "maxLength": 12},
                                "role": {"$ref": "#/$defs/Role"}},
                 "required": ["name", "role"],
                 "$defs": {"Role": {"enum": ["admin", "user"], "title": "Role", "type": "string"}}},
    "enum-array": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 2, "maxItems": 3,
                   "uniqueItems": False},
}
REGEXES = [r"\d{3}-\d{4}", r"(cat|dog)s? [a-z]{2,8}", r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)"]
CHOICES = ["yes", "no", 'say "maybe"', "back\\slash"]
# (EBNF, the same language as a Python regular expression)
GRAMMARS = [
    ('root ::= term ([+*-] term){0,3}\nterm ::= [0-9]{1,3}', r"[0-9]{1,3}([+*-][0-9]{1,3}){0,3}"),
    ('root ::= ("yes" | "no") ", because " [a-z ]{1,20} "."', r"(yes|no), because [a-z ]{1,20}\."),
]
GUIDES = (
    [Guide(kind="json", spec=json.dumps(schema)) for schema in SCHEMAS.values()]
    + [Guide(kind="json_object")]
    + [Guide(kind="regex", spec=pattern) for pattern in REGEXES]
    + [Guide(kind="choice", spec=json.dumps(CHOICES))]
    + [Guide(kind="grammar", spec=ebnf) for ebnf, _ in GRAMMARS]
)
MAX_TOKENS = 120


def matches(guide: Guide, text: str) -> bool:
    """Whether `text` is in the guide's language, checked without xgrammar."""
    if guide.kind in ("json", "json_object"):
        schema = json.loads(guide.spec) if guide.kind == "json" else {"type": "object"}
        try:
            jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        return True
    if guide.kind == "regex":
        return re.fullmatch(guide.spec, text) is not None
    if guide.kind == "choice":
        return text in json.loads(guide.spec)
    return re.fullmatch(dict(GRAMMARS)[guide.spec], text) is not None


def run(coro):
    return asyncio.run(coro)


async def gather(engine, prompts, params_list, adapters=None):
    adapters = adapters or [None] * len(prompts)
    return await asyncio.gather(*(collect(engine, p, params, delay=0.002 * i, adapter=a)
                                  for i, (p, params, a) in enumerate(zip(prompts, params_list, adapters))))


@pytest.fixture(scope="module")
def engine(model_dir, adapter_dir):
    engine = start_engine(model_dir("llama"), kv_cache_memory="16MiB", adapters_dir=str(adapter_dir),
                          max_gpu_adapters=3)
    yield engine
    engine.shutdown()


def greedy(guide: Guide | None, max_tokens: int = MAX_TOKENS, **options) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, guide=guide, **options)


def sampled(guide: Guide | None, seed: int, max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, guide=guide)


@pytest.fixture(scope="module")
def guided_greedy(engine, tokenizer):
    """Every guide's greedy output, all in one batch: (prompt, (ids, text, finish reason)) per guide."""
    prompts = varied_prompts(tokenizer, len(GUIDES), seed=21)
    return list(zip(prompts, run(gather(engine, prompts, [greedy(g) for g in GUIDES]))))


def test_there_are_twenty_guides_of_every_kind():
    assert len(GUIDES) >= 20 and {g.kind for g in GUIDES} == {"json", "json_object", "regex", "choice", "grammar"}


def test_unguided_output_of_the_tiny_model_matches_no_guide(engine, guided_greedy):
    """The strong test: the tiny model's own output is gibberish, so only the mask makes it match."""
    free = run(gather(engine, [p for p, _ in guided_greedy], [greedy(None, 40)] * len(GUIDES)))
    assert not any(matches(g, text) for g, (_ids, text, _reason) in zip(GUIDES, free))


def test_greedy_outputs_match_their_guides(guided_greedy):
    stopped = [(g, text) for g, (_prompt, (_ids, text, reason)) in zip(GUIDES, guided_greedy) if reason == "stop"]
    assert [(g, text) for g, text in stopped if not matches(g, text)] == []
    # any JSON object may hold a string without end: the random model's can outlast max_tokens
    assert len(stopped) >= len(GUIDES) - 1


def test_sampled_outputs_match_their_guides(engine, tokenizer):
    prompts = varied_prompts(tokenizer, len(GUIDES), seed=22)
    results = run(gather(engine, prompts, [sampled(g, seed=i) for i, g in enumerate(GUIDES)]))
    stopped = [(g, text) for g, (_ids, text, reason) in zip(GUIDES, results) if reason == "stop"]
    assert [(g, text) for g, text in stopped if not matches(g, text)] == []
    assert len(stopped) >= len(GUIDES) - 2, "too few sampled outputs ended within max_tokens"


def allowed_tokens(matcher: GrammarMatcher, vocab: int) -> torch.Tensor:
    """[vocab] bool: the tokens the matcher allows next."""
    bitmask = allocate_token_bitmask(1, vocab)  # [1, ceil(vocab / 32)]
    matcher.fill_next_token_bitmask(bitmask)
    return ((bitmask[0][:, None] >> torch.arange(32)) & 1).flatten()[:vocab].bool()


def test_the_mask_changes_nothing_but_the_forbidden_tokens(engine, model_dir, guided_greedy):
    """Teacher-forced through the plain HF model: each guided greedy token is the most likely of those the grammar
    allowed there, so it is the unconstrained choice wherever the grammar allowed that."""
    model, _ = load_model(model_dir("llama"), "none", torch.float32, CPU)
    vocab = engine.vocab_size
    unconstrained_allowed = 0
    for guide, (prompt, (ids, _text, reason)) in zip(GUIDES, guided_greedy):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]  # [len(ids), vocab]
        matcher = run(engine.grammars.matcher(guide))
        for position, token in enumerate(ids):
            allowed = allowed_tokens(matcher, vocab)
            best = int(logits[position].argmax())
            assert token == int(logits[position].masked_fill(~allowed, float("-inf")).argmax())
            if allowed[best]:
                unconstrained_allowed += 1
                assert token == best
            assert matcher.accept_token(token)
        assert matcher.is_terminated() == (reason == "stop")
    assert unconstrained_allowed > 10, "the grammar never allowed the model's own choice: a weak test"


def test_mixed_batch_of_guided_unguided_and_adapter_rows(engine, model_dir, adapter_dir, tokenizer):
    """The shared mixed-adapter workload with guided rows (on the base and on adapters) in the same batch: the
    unguided rows give PEFT's tokens, the guided rows what they give alone."""
    workload = mixed_workload(tokenizer)
    guided = [(name, guide) for name, guide in zip([None, "qv-r8", "all-r16-rslora", "mlp-patterns"] * 2, GUIDES[::3])]
    guided_prompts = varied_prompts(tokenizer, len(guided), seed=23)
    alone = [run(collect(engine, p, greedy(g), adapter=a)) for p, (a, g) in zip(guided_prompts, guided)]
    prompts = [p for _a, p in workload] + guided_prompts
    params = [greedy(None, 10)] * len(workload) + [greedy(g) for _a, g in guided]
    together = run(gather(engine, prompts, params, [a for a, _p in workload] + [a for a, _g in guided]))
    assert [ids for ids, _t, _r in together[: len(workload)]] == expected(model_dir, adapter_dir, workload)
    assert together[len(workload):] == alone
    assert all(matches(g, text) for (_a, g), (_ids, text, _r) in zip(guided, alone))
    assert alone != run(gather(engine, guided_prompts, [greedy(g) for _a, g in guided])), "adapters changed nothing"


def test_guided_outputs_survive_preemption(model_dir, engine, tokenizer):
    """Long guided outputs in a KV cache too small for all of them at once: preempted and recomputed, they equal
    the outputs of the roomy engine (greedy and seeded), and match their guides."""
    guides = [Guide(kind="regex", spec=r"[0-9]{40}"), Guide(kind="json", spec=json.dumps(
        {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 16, "maxItems": 16}))] * 3
    prompts = varied_prompts(tokenizer, len(guides), seed=24)
    params = [greedy(g) if i % 3 else sampled(g, seed=i) for i, g in enumerate(guides)]
    roomy = run(gather(engine, prompts, params))
    small = start_engine(model_dir("llama"), block_size=8, kv_cache_memory=24 * 8 * 512, max_batch_tokens=64,
                         max_gpu_adapters=0)
    try:
        tight = run(gather(small, prompts, params))
    finally:
        small.shutdown()
    assert small.scheduler.num_preemptions > 0
    assert tight == roomy
    assert all(reason == "stop" and matches(g, text) for g, (_ids, text, reason) in zip(guides, tight))


def test_the_decode_graph_path_masks_its_outputs(model_dir, engine, tokenizer):
    """The CUDA path's decode graphs (run eagerly on the CPU) produce the logits the mask rewrites: same outputs."""
    model, tok = load_model(model_dir("llama"), "none", torch.float32, CPU)
    config = EngineConfig(max_gpu_adapters=0, max_num_seqs=8, max_model_len=512)
    graphed = Engine(model, tok, config, CPU, decode_graph=EagerGraph).start()
    guides = GUIDES[:8]
    prompts = varied_prompts(tokenizer, len(guides), seed=25)
    try:
        assert run(gather(graphed, prompts, [greedy(g) for g in guides])) == run(
            gather(engine, prompts, [greedy(g) for g in guides]))
    finally:
        graphed.shutdown()


def test_a_length_bounded_string_admits_no_raw_control_character(engine):
    """xgrammar #800: its own path for minLength/maxLength lets a raw control character (invalid JSON) into the
    string; the schema's bounded strings are compiled as patterns instead."""
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "string", "minLength": 1, "maxLength": 4}}}, "required": ["items"]}
    guide = Guide(kind="json", spec=json.dumps(schema))
    for text, valid in (('{"items": ["ab", "cdef"]}', True), ('{"items": ["a\x08"]}', False),
                        ('{"items": [""]}', False), ('{"items": ["abcde"]}', False)):
        matcher = run(engine.grammars.matcher(guide))
        assert (matcher.accept_string(text) and matcher.is_completed()) == valid, text


def test_max_tokens_cuts_a_guided_output_with_length(engine, tokenizer):
    guide = Guide(kind="json", spec=json.dumps(SCHEMAS["nested"]))
    ids, text, reason = run(collect(engine, varied_prompts(tokenizer, 1)[0], greedy(guide, max_tokens=3)))
    assert len(ids) == 3 and reason == "length" and text.startswith("{")


def test_a_stop_string_ends_a_guided_output_and_frees_it(engine, tokenizer):
    prompt = varied_prompts(tokenizer, 1, seed=26)[0]
    guide = Guide(kind="regex", spec=r"[0-9]{30}")
    _ids, full, _reason = run(collect(engine, prompt, greedy(guide)))
    _ids, cut, reason = run(collect(engine, prompt, greedy(guide, stop=[full[10:12]])))
    assert reason == "stop" and full.startswith(cut) and len(cut) <= 10
    assert wait_until(lambda: len(engine.scheduler) == 0), "the stopped request was not dropped"


def test_a_cancelled_guided_request_is_dropped(engine, tokenizer):
    async def cancel_after_two():
        digits = Guide(kind="regex", spec="[0-9]{50}")
        stream = engine.generate(varied_prompts(tokenizer, 1, seed=27)[0], greedy(digits))
        outputs = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return outputs

    assert len(run(cancel_after_two())) == 2
    assert wait_until(lambda: len(engine.scheduler) == 0), "the cancelled request was not dropped"


def test_the_grammar_ends_a_guided_output_even_with_ignore_eos_or_min_tokens(engine, tokenizer):
    prompt = varied_prompts(tokenizer, 1, seed=28)[0]
    choice = Guide(kind="choice", spec=json.dumps(CHOICES))
    for options in ({"ignore_eos": True}, {"min_tokens": 30}):
        ids, text, reason = run(collect(engine, prompt, greedy(choice, **options)))
        assert reason == "stop" and text in CHOICES and len(ids) < 30
    # where the grammar can go on, min_tokens holds: digits are one token each
    ids, text, reason = run(collect(engine, prompt, greedy(Guide(kind="regex", spec="[0-9]+"), min_tokens=12)))
    assert reason == "stop" and len(ids) >= 12 and re.fullmatch("[0-9]+", text)


@pytest.mark.parametrize(("guide", "message"), [
    (Guide(kind="json", spec='{"type": "objec"}'), 'the JSON schema does not compile: Unsupported type "objec"'),
    (Guide(kind="json", spec="{not json"), "the JSON schema is not valid JSON: Expecting property name"),
    (Guide(kind="json", spec='{"type": "integer", "minimum": 5, "maximum": 1}'),
     "the JSON schema does not compile: Invalid range: minimum greater than maximum"),
    (Guide(kind="regex", spec="a(b"),
     "the regular expression does not compile: Regex parsing error at position 4: The parenthesis is not closed"),
    (Guide(kind="grammar", spec="root ::= missing"), 'the grammar does not compile: EBNF parser error at line 1'),
    (Guide(kind="choice", spec='["a", 1]'), "the choice must be a non-empty JSON array of strings"),
    (Guide(kind="choice", spec="[]"), "the choice must be a non-empty JSON array of strings"),
    (Guide.model_construct(kind="regex", spec="a" * (MAX_GUIDE_CHARS + 1)),
     f"the regular expression has {MAX_GUIDE_CHARS + 1} characters; at most {MAX_GUIDE_CHARS} are accepted"),
])
def test_a_bad_guide_is_refused_with_what_is_wrong(engine, guide, message):
    with pytest.raises(GrammarError) as refused:
        run(collect(engine, [1, 2, 3], greedy(guide)))
    assert isinstance(refused.value, RequestError)
    assert str(refused.value).startswith(message)


def slow_schema(properties: int = 256) -> Guide:
    """A schema of many long-bounded string patterns: seconds to compile on the tiny vocabulary."""
    pattern = "^[a-z]{{{},{}}}[0-9]{{{},{}}}$"
    schema = {"type": "object", "required": [f"f{i}" for i in range(properties)], "properties": {
        f"f{i}": {"type": "string", "pattern": pattern.format(i % 7 + 1, 100 + i, i % 5 + 1, 100 + 2 * i)}
        for i in range(properties)}}
    return Guide(kind="json", spec=json.dumps(schema))


def test_a_slow_compile_delays_no_plain_request_and_times_out(model_dir, tokenizer):
    """The compile runs in its own thread: a plain request submitted beside it is served at once; the guided request
    is refused at the timeout, and the compile runs on (and is cached for the next request)."""
    engine = start_engine(model_dir("llama"), grammar_compile_timeout=0.5, max_gpu_adapters=0)
    guide = slow_schema()
    prompt = varied_prompts(tokenizer, 1, seed=29)[0]

    async def race():
        started = time.perf_counter()

        async def plain():
            async for _output in engine.generate(prompt, greedy(None, 8)):
                return time.perf_counter() - started

        async def guided():
            try:
                await collect(engine, prompt, greedy(guide))
            except GrammarError as error:
                return time.perf_counter() - started, str(error)

        first_token, (refused, message) = await asyncio.gather(plain(), guided())
        engine.grammars.compile_timeout = 60
        await engine.grammars.matcher(guide)
        return first_token, refused, message, time.perf_counter() - started

    try:
        first_token, refused, message, compiled = run(race())
    finally:
        engine.shutdown()
    assert message == "the JSON schema took longer than 0.5 s to compile"
    assert 0.5 <= refused < compiled
    assert first_token < 0.5 and first_token < compiled / 3


def test_one_guided_request_on_the_default_model_gives_valid_json():
    from loradock.serve.models.default_model import default_model_path

    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
              "properties": {"city": {"type": "string", "maxLength": 40},
                             "country": {"type": "string", "maxLength": 40},
                             "population": {"type": "integer", "minimum": 0}}}
    engine = start_engine(default_model_path(), max_model_len=512, kv_cache_memory="64MiB", max_gpu_adapters=0)
    try:
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Describe Paris as JSON with its city, country and population."}],
            add_generation_prompt=True, tokenize=True, return_dict=False)
        _ids, text, reason = run(collect(engine, prompt, greedy(Guide(kind="json", spec=json.dumps(schema)), 80)))
    finally:
        engine.shutdown()
    assert reason == "stop"
    jsonschema.validate(json.loads(text), schema)
    assert "Paris" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_guided_rows_on_cuda_graphs(model_dir, tokenizer):
    """On CUDA the bitmask goes to the device and the mask rewrites the graphs' logits: outputs match their guides,
    and the unguided rows beside them are unchanged."""
    engine = start_engine(model_dir("llama"), device=torch.device("cuda"), max_num_seqs=32, max_model_len=512,
                          max_gpu_adapters=0)
    prompts = varied_prompts(tokenizer, len(GUIDES), seed=30)
    try:
        plain = run(gather(engine, prompts, [greedy(None, 10)] * len(GUIDES)))
        mixed = run(gather(engine, prompts * 2, [greedy(g) for g in GUIDES] + [greedy(None, 10)] * len(GUIDES)))
    finally:
        engine.shutdown()
    assert mixed[len(GUIDES):] == plain
    assert all(reason == "stop" and matches(g, text) for g, (_ids, text, reason) in zip(GUIDES, mixed))
