"""Structured outputs and the rest of the request body over real HTTP: response_format and structured_outputs answers
that match (validated by `jsonschema`), `client.chat.completions.parse()` with a pydantic model on the default model,
the refusals of bad schemas and of fields loradock cannot honour (each a 400 naming the field), content parts,
and the penalties, logit_bias and min_tokens reaching the engine."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from http_client import call
from pydantic import BaseModel, Field
from server_support import MODEL_NAME, ServerThread

from loradock.serve.engine.guide import MAX_GUIDE_CHARS

SCHEMAS = {
    "enum-and-integer": {"type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["colour", "count"], "additionalProperties": False},
    "nested-array": {"type": "object", "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
    "optional-and-bounded-string": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8}, "note": {"type": "string", "maxLength": 4}},
        "required": ["name"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerThread(model_dir("llama"), kv_cache_memory="16MiB") as running:
        yield running


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}


def complete(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, **fields}


def json_schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# ---- answers that match -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMAS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_json_schema_answer_validates(server, name, stream):
    request = dict(model=MODEL_NAME, messages=chat()["messages"], response_format=json_schema_format(SCHEMAS[name]),
                   temperature=0.8, seed=7, max_tokens=120)
    if stream:
        chunks = list(client(server).chat.completions.create(**request, stream=True))
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client(server).chat.completions.create(**request).choices[0]
        content, finish = choice.message.content, choice.finish_reason
        assert choice.message.refusal is None
    assert finish == "stop", content
    jsonschema.validate(json.loads(content), SCHEMAS[name])


def test_a_json_object_answer_is_an_object(server):
    choice = client(server).chat.completions.create(model=MODEL_NAME, messages=chat()["messages"], max_tokens=200,
                                                    response_format={"type": "json_object"}, temperature=0.7,
                                                    seed=1).choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content), dict)


COMPLETION_GUIDES = {
    "regex": ({"regex": r"[0-9]{3}-[a-z]{2}"}, lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2}", text)),
    "choice": ({"choice": ["yes", "no", "maybe so"]}, lambda text: text in ("yes", "no", "maybe so")),
    "grammar": ({"grammar": 'root ::= ("ab" | "cd") " " [0-9]+'}, lambda text: re.fullmatch(r"(ab|cd) [0-9]+", text)),
    "json-as-text": ({"json": json.dumps(SCHEMAS["enum-and-integer"])},
                     lambda text: jsonschema.validate(json.loads(text), SCHEMAS["enum-and-integer"]) or True),
}


@pytest.mark.parametrize("case", COMPLETION_GUIDES)
def test_structured_outputs_on_completions(server, case):
    guide, matches = COMPLETION_GUIDES[case]
    done = client(server).completions.create(model=MODEL_NAME, prompt="The answer:", max_tokens=40, temperature=0.7,
                                             seed=3, extra_body={"structured_outputs": guide})
    choice = done.choices[0]
    assert choice.finish_reason == "stop" and matches(choice.text), choice.text


def test_structured_outputs_on_chat(server):
    choice = client(server).chat.completions.create(
        model=MODEL_NAME, messages=chat()["messages"], max_tokens=10, temperature=0,
        extra_body={"structured_outputs": {"choice": ["left", "right"]}}).choices[0]
    assert choice.message.content in ("left", "right")


# ---- refusals -----------------------------------------------------------------------------------------------

REFUSED = {  # case -> (endpoint, body, param, words in the message)
    "schema-not-an-object": ("chat", chat(response_format=json_schema_format([1])), "response_format",
                             ["response_format", "dictionary"]),
    "schema-too-large": ("chat", chat(response_format=json_schema_format(
        {"type": "object", "description": "x" * MAX_GUIDE_CHARS})), "response_format", ["too large"]),
    "schema-that-does-not-compile": ("chat", chat(response_format=json_schema_format({"type": "no-such-type"})),
                                     "response_format", ["JSON schema"]),
    "unknown-format-type": ("chat", chat(response_format={"type": "yaml"}), "response_format", ["yaml"]),
    "json-text-not-json": ("completions", complete(structured_outputs={"json": "{oops"}), "structured_outputs",
                           ["not JSON"]),
    "json-not-an-object": ("completions", complete(structured_outputs={"json": "[1]"}), "structured_outputs",
                           ["JSON object"]),
    "regex-that-does-not-compile": ("completions", complete(structured_outputs={"regex": "(unclosed"}),
                                    "structured_outputs", ["regular expression"]),
    "structural-tag": ("completions", complete(structured_outputs={"structural_tag": "{}"}), "structured_outputs",
                       ["structural_tag"]),
    "two-constraints": ("completions", complete(structured_outputs={"regex": "a", "choice": ["a"]}),
                        "structured_outputs", ["exactly one", "regex, choice"]),
    "no-constraint": ("chat", chat(structured_outputs={}), "structured_outputs", ["exactly one"]),
    "both-fields": ("chat", chat(response_format={"type": "json_object"}, structured_outputs={"regex": "a"}),
                    "structured_outputs", ["not both"]),
    "guided_json": ("chat", chat(guided_json={"type": "object"}), "guided_json", ["structured_outputs"]),
    "guided_regex": ("completions", complete(guided_regex="a+"), "guided_regex", ["structured_outputs"]),
    "guided_choice": ("completions", complete(guided_choice=["a"]), "guided_choice", ["structured_outputs"]),
    "guided_grammar": ("chat", chat(guided_grammar="root ::= 'a'"), "guided_grammar", ["structured_outputs"]),
    # fields of OpenAI's requests that would change the answer
    "audio": ("chat", chat(audio={"voice": "alloy", "format": "wav"}), "audio", ["audio"]),
    "modalities": ("chat", chat(modalities=["text", "audio"]), "modalities", ["text"]),
    "web_search_options": ("chat", chat(web_search_options={}), "web_search_options", ["web search"]),
    "verbosity": ("chat", chat(verbosity="low"), "verbosity", ["verbosity"]),
    "reasoning_effort": ("chat", chat(reasoning_effort="high"), "reasoning_effort", ["reasoning_effort"]),
    "n": ("chat", chat(n=2), "n", ["n"]),
    "best_of": ("completions", complete(best_of=3), "best_of", ["best_of"]),
    "suffix": ("completions", complete(suffix="}"), "suffix", ["suffix"]),
    "image-part": ("chat", chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]),
        "messages", ["image_url"]),
    "audio-part": ("chat", chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), "messages",
                   ["input_audio"]),
    "presence_penalty": ("completions", complete(presence_penalty=2.5), "presence_penalty", ["2"]),
    "frequency_penalty": ("chat", chat(frequency_penalty=-3), "frequency_penalty", ["-2"]),
    "repetition_penalty": ("chat", chat(repetition_penalty=0), "repetition_penalty", ["greater than 0"]),
    "min_tokens-negative": ("completions", complete(min_tokens=-1), "min_tokens", ["min_tokens"]),
    "min_tokens-beyond-max_tokens": ("completions", complete(min_tokens=9, max_tokens=4), "min_tokens",
                                     ["max_tokens (4)"]),
    "logit_bias-beyond-100": ("chat", chat(logit_bias={"5": 101}), "logit_bias", ["[-100, 100]"]),
    "logit_bias-not-a-token-id": ("completions", complete(logit_bias={"hello": 1}), "logit_bias", ["'hello'"]),
    "logit_bias-outside-the-vocabulary": ("completions", complete(logit_bias={"99999": 5}), "logit_bias",
                                          ["99999"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_request_names_the_field(server, case):
    endpoint, body, param, words = REFUSED[case]
    reply = call(server.url, "POST", f"/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", body)
    assert reply.status == 400, reply.body[:500]
    error = reply.error
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], (word, error["message"])


NO_EFFECT = dict(metadata={"run": "7"}, store=True, user="u-1", safety_identifier="s-1", service_tier="auto",
                 prompt_cache_key="k", prediction={"type": "content", "content": "Hello"}, modalities=["text"],
                 parallel_tool_calls=False, response_format={"type": "text"}, tool_choice="none")


def test_fields_without_effect_are_accepted_and_change_nothing(server):
    plain = call(server.url, "POST", "/v1/chat/completions", chat(temperature=0, return_token_ids=True)).json()
    tagged = call(server.url, "POST", "/v1/chat/completions", chat(temperature=0, return_token_ids=True,
                                                                   **NO_EFFECT)).json()
    assert tagged["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
    done = call(server.url, "POST", "/v1/completions", complete(user="u-1", suffix="", best_of=1))
    assert done.status == 200, done.body[:500]


# ---- the rest of the body -----------------------------------------------------------------------------------


def test_text_parts_are_joined(server):
    parts = [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]
    joined = call(server.url, "POST", "/v1/chat/completions",
                  chat(messages=[{"role": "user", "content": "Name a colour."}], temperature=0,
                       return_token_ids=True)).json()
    split = call(server.url, "POST", "/v1/chat/completions",
                 chat(messages=[{"role": "user", "content": parts}], temperature=0, return_token_ids=True)).json()
    assert split["usage"]["prompt_tokens"] == joined["usage"]["prompt_tokens"]
    assert split["choices"][0]["token_ids"] == joined["choices"][0]["token_ids"]


def greedy(server, **fields) -> list[int]:
    body = complete(temperature=0, ignore_eos=True, return_token_ids=True, max_tokens=3, **fields)
    reply = call(server.url, "POST", "/v1/completions", body)
    assert reply.status == 200, reply.body[:500]
    return reply.json()["choices"][0]["token_ids"]


def test_logit_bias_steers_the_greedy_answer(server):
    chosen = 200  # an ordinary byte-level token of the tiny vocabulary
    assert greedy(server) != [chosen] * 3
    assert greedy(server, logit_bias={str(chosen): 100}) == [chosen] * 3
    first = greedy(server)[0]
    assert greedy(server, logit_bias={str(first): -100})[0] != first


def test_sampling_fields_reach_the_engine(server, monkeypatch):
    seen = []
    generate = server.engine.generate

    def spy(prompt, params, **kw):
        seen.append(params)
        return generate(prompt, params, **kw)

    monkeypatch.setattr(server.engine, "generate", spy)
    fields = dict(presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.3, min_tokens=2,
                  logit_bias={"7": -5, "9": 2.5})
    for endpoint, body in (("/v1/completions", complete(**fields)), ("/v1/chat/completions", chat(**fields))):
        assert call(server.url, "POST", endpoint, body).status == 200
    for params in seen:
        assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty, params.min_tokens,
                params.logit_bias) == (0.5, -0.25, 1.3, 2, ((7, -5.0), (9, 2.5)))
    assert len(seen) == 2


# ---- the default model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(smollm_path):
    with ServerThread(smollm_path, max_model_len=1024) as running:
        yield running


class City(BaseModel):
    name: Literal["Paris", "London", "Rome"]
    country: str = Field(max_length=20)
    landmarks: list[str] = Field(max_length=3)


def test_parse_with_a_pydantic_model_on_the_default_model(smollm):
    done = client(smollm).chat.completions.parse(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Describe Paris in JSON."}], response_format=City,
        temperature=0, max_tokens=120)
    message = done.choices[0].message
    assert isinstance(message.parsed, City) and message.refusal is None
    assert message.parsed.name == "Paris"


def test_json_schema_answers_of_the_default_model_validate(smollm):
    schema = SCHEMAS["enum-and-integer"]
    for question in ("Pick a colour and a count.", "What colour is the sky, and how many suns are there?"):
        choice = client(smollm).chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=40,
            response_format=json_schema_format(schema)).choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
