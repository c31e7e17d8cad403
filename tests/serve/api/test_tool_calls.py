"""Tool calling: each --tool-call-parser format read out of sample texts (malformed ones included), whole and
streamed alike; the grammar that forces calls; the prompt of a template with and without tool support; refusals
over real HTTP; forced calls on the tiny model in every format; and a round trip through the official `openai`
client on the default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import jsonschema
import openai
import pytest
from http_client import call
from pydantic import BaseModel
from server_support import MODEL_NAME, ServerThread
from xgrammar.testing import _is_grammar_accept_string as grammar_accepts

from loradock.serve.api.chat_prompt import chat_prompt
from loradock.serve.api.errors import APIError
from loradock.serve.api.schemas import ChatCompletionRequest, FunctionDefinition
from loradock.serve.api.tool_answers import StreamedAnswer, read_answer
from loradock.serve.api.tool_calls import ToolUse, tool_use
from loradock.serve.api.tool_grammar import tool_call_grammar
from loradock.serve.api.tool_parsers import TOOL_CALL_FORMATS, ParsedCall

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 9}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
NAMES = frozenset(SCHEMAS)


def use(parser: str, max_calls: int | None = None) -> ToolUse:
    return ToolUse(TOOL_CALL_FORMATS[parser], names=NAMES, max_calls=max_calls)


def calls(*pairs) -> list[ParsedCall]:
    return [ParsedCall(name, json.dumps(arguments)) for name, arguments in pairs]


PARIS = ("get_weather", {"city": "Paris"})
ONE_TWO = ("add", {"a": 1, "b": 2})

# ---- the parsers on sample texts --------------------------------------------------------------------------

PARSED = {  # (parser, text) -> (content, calls)
    "hermes-one": ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                   None, calls(PARIS)),
    "hermes-text-then-two": ("hermes", 'Let me see.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
                             '"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                             "</tool_call>\n", "Let me see.", calls(PARIS, ONE_TWO)),
    "hermes-arguments-as-text": ("hermes", '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}'
                                 "</tool_call>", None, calls(ONE_TWO)),
    "hermes-unclosed-at-the-end": ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}', None,
                                   calls(ONE_TWO)),
    "hermes-bad-json": ("hermes", "<tool_call>\n{name: add}\n</tool_call>", "<tool_call>\n{name: add}\n</tool_call>",
                        []),
    "hermes-unknown-tool": ("hermes", '<tool_call>{"name": "rm", "arguments": {}}</tool_call>',
                            '<tool_call>{"name": "rm", "arguments": {}}</tool_call>', []),
    "hermes-one-good-one-bad": ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
                                "<tool_call>oops</tool_call>", "\n<tool_call>oops</tool_call>", calls(ONE_TWO)),
    "hermes-plain-text": ("hermes", "a < b, and <tool is not a call ", "a < b, and <tool is not a call ", []),
    "llama3-one": ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, calls(PARIS)),
    "llama3-tag-two": ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                       '{"name": "add", "parameters": {"a": 1, "b": 2}}', None, calls(PARIS, ONE_TWO)),
    "llama3-arguments-key": ("llama3_json", '{"name": "add", "arguments": {"a": 1, "b": 2}}', None, calls(ONE_TWO)),
    "llama3-json-answer": ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    "llama3-unknown-tool": ("llama3_json", '{"name": "rm", "parameters": {}}', '{"name": "rm", "parameters": {}}',
                            []),
    "llama3-truncated": ("llama3_json", '{"name": "add", "parameters": {"a": 1',
                         '{"name": "add", "parameters": {"a": 1', []),
    "llama3-text-first": ("llama3_json", 'Sure: {"name": "add", "parameters": {}}',
                          'Sure: {"name": "add", "parameters": {}}', []),
    "mistral-two": ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                    '{"name": "add", "arguments": {"a": 1, "b": 2}}]', None, calls(PARIS, ONE_TWO)),
    "mistral-marker-dropped": ("mistral", ' [{"name": "add", "arguments": {"a": 1, "b": 2}}]', None, calls(ONE_TWO)),
    "mistral-text-first": ("mistral", 'Sure.[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', "Sure.",
                           calls(ONE_TWO)),
    "mistral-plain-array": ("mistral", "[1, 2] are numbers", "[1, 2] are numbers", []),
    "mistral-unknown-tool": ("mistral", '[TOOL_CALLS][{"name": "rm", "arguments": {}}]',
                             '[TOOL_CALLS][{"name": "rm", "arguments": {}}]', []),
    "mistral-bad-json": ("mistral", "[TOOL_CALLS][{oops", "[TOOL_CALLS][{oops", []),
}


@pytest.mark.parametrize("case", PARSED)
def test_a_parser_reads_its_format(case):
    parser, text, content, expected = PARSED[case]
    answer = read_answer(text, use(parser))
    assert (answer.content, answer.calls) == (content, expected)


@pytest.mark.parametrize("case", PARSED)
@pytest.mark.parametrize("piece", [1, 4])
def test_streaming_releases_what_the_whole_answer_holds(case, piece):
    parser, text, content, expected = PARSED[case]
    stream, streamed_content, streamed_calls = StreamedAnswer(use(parser)), "", []
    for at in range(0, len(text), piece):
        released = stream.feed(text[at : at + piece], final=at + piece >= len(text))
        streamed_content += released.content
        streamed_calls += released.calls
    assert (streamed_content or None, streamed_calls) == (content, expected)


def test_text_that_may_open_a_call_is_held_back():
    stream = StreamedAnswer(use("hermes"))
    assert stream.feed("Hi <tool", final=False).content == "Hi"  # the space too: it may end the content
    assert stream.feed("tip>", final=False).content == " <tooltip>"


def test_without_parallel_calls_only_the_first_counts():
    text = PARSED["hermes-text-then-two"][1]
    assert read_answer(text, use("hermes", max_calls=1)).calls == calls(PARIS)


# ---- the grammar that forces calls --------------------------------------------------------------------------

FUNCTIONS = [FunctionDefinition.model_validate(tool["function"]) for tool in TOOLS]


@pytest.mark.parametrize("parser", list(TOOL_CALL_FORMATS))
def test_the_grammar_takes_calls_that_match_the_schemas_and_nothing_else(parser):
    format = TOOL_CALL_FORMATS[parser]
    one = tool_call_grammar(FUNCTIONS, format, parallel=False)
    many = tool_call_grammar(FUNCTIONS, format, parallel=True)
    paris = calls(("get_weather", {"city": "Paris", "unit": "celsius"}))
    both = paris + calls(ONE_TWO)
    assert grammar_accepts(one, format.write(paris)) and grammar_accepts(many, format.write(both))
    assert not grammar_accepts(one, format.write(both))
    for wrong in [("get_weather", {"city": "Oslo", "unit": "celsius"}), ("add", {"a": 1}), ("add", {"a": 1, "b": 22}),
                  ("sub", {"a": 1, "b": 2})]:
        assert not grammar_accepts(many, format.write(calls(wrong))), wrong


def test_a_function_without_parameters_is_called_with_an_empty_object():
    format = TOOL_CALL_FORMATS["hermes"]
    grammar = tool_call_grammar([FunctionDefinition(name="now")], format, parallel=False)
    assert grammar_accepts(grammar, format.write(calls(("now", {}))))
    assert not grammar_accepts(grammar, '<tool_call>\n{"name": "now", "arguments": 1}\n</tool_call>')


class Point(BaseModel):
    x: int
    y: int


class Path(BaseModel):
    points: list[Point]
    closed: bool


def test_the_grammar_follows_references_inside_a_parameter_schema():
    draw = FunctionDefinition(name="draw", parameters=Path.model_json_schema())  # points refer to #/$defs/Point
    grammar = tool_call_grammar([draw, *FUNCTIONS], TOOL_CALL_FORMATS["hermes"], parallel=False)
    good = calls(("draw", {"points": [{"x": 1, "y": 2}], "closed": False}))
    bad = calls(("draw", {"points": [{"x": 1}], "closed": False}))
    assert grammar_accepts(grammar, TOOL_CALL_FORMATS["hermes"].write(good))
    assert not grammar_accepts(grammar, TOOL_CALL_FORMATS["hermes"].write(bad))


def test_a_schema_the_grammar_cannot_follow_is_refused_naming_the_tool():
    broken = FunctionDefinition(name="broken", parameters={"type": "object", "properties": {
        "x": {"$ref": "#/$defs/Missing"}}})
    with pytest.raises(APIError) as refused:
        tool_call_grammar([*FUNCTIONS, broken], TOOL_CALL_FORMATS["hermes"], parallel=True)
    assert refused.value.status == 400 and refused.value.param == "tools"
    assert "broken" in refused.value.message and "Missing" in refused.value.message


# ---- the prompt -----------------------------------------------------------------------------------------------

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris, and 1 + 2?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "3"}]},
]


def rendered(tokenizer, messages, **fields) -> str:
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **fields})
    state = SimpleNamespace(engine=SimpleNamespace(tokenizer=tokenizer, tokenize=list))
    return tokenizer.decode(chat_prompt(state, body, tool_use(body, TOOL_CALL_FORMATS["hermes"])))


def test_a_template_without_tools_gets_them_in_hermes_form(tokenizer):
    text = rendered(tokenizer, HISTORY, tools=TOOLS)
    tools = "\n".join(json.dumps(tool) for tool in TOOLS)
    assert text.startswith(f"<s><|system|>\nBe brief.\n\n# Tools\n\n")  # the tiny model's template: <|role|>\n...
    assert f"<tools>\n{tools}\n</tools>\n\nFor each function call" in text
    assert ('<|assistant|>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|end|>') in text
    assert "<|user|>\n<tool_response>\n18 C\n</tool_response>\n<tool_response>\n3\n</tool_response><|end|>" in text
    assert text.endswith("<|assistant|>\n")


def test_tool_choice_none_renders_no_tools(tokenizer):
    assert "<tools>" not in rendered(tokenizer, HISTORY, tools=TOOLS, tool_choice="none")


def test_a_template_with_tools_renders_them_itself(tokenizer):
    own = copy.deepcopy(tokenizer)
    own.chat_template = ("{% for tool in tools or [] %}TOOL {{ tool.function.name }};{% endfor %}"
                         "{% for m in messages %}[{{ m.role }}: {{ m.content }}"
                         "{% for c in m.tool_calls or [] %} CALL {{ c.function.name }} {{ c.function.arguments.a }}"
                         "{% endfor %}]{% endfor %}")
    text = rendered(own, HISTORY, tools=TOOLS)
    assert text.startswith("TOOL get_weather;TOOL add;[system: Be brief.]")
    assert "CALL add 1]" in text  # the arguments reach the template as an object
    assert "[tool: 18 C][tool: 3]" in text and "# Tools" not in text


# ---- refusals over HTTP, and forced calls on the tiny model ---------------------------------------------------


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerThread(model_dir("llama"), kv_cache_memory="16MiB") as running:
        yield running


def chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, **fields}


def tool(name="f", parameters=None) -> dict:
    function = {"name": name} if parameters is None else {"name": name, "parameters": parameters}
    return {"type": "function", "function": function}


REFUSED = {
    "name-with-a-space": (dict(tools=[tool("get weather")]), "tools", ["tools.0.function.name", "'get weather'"]),
    "name-too-long": (dict(tools=[tool("f" * 65)]), "tools", ["tools.0.function.name"]),
    "names-twice": (dict(tools=[tool("f"), tool("f")]), "tools", ["unique", "f"]),
    "parameters-not-an-object": (dict(tools=[tool("f", {"type": "array"})]), "tools", ["tools.0", "object"]),
    "not-a-function": (dict(tools=[{"type": "web_search"}]), "tools", ["tools.0"]),
    "unknown-tool-choice": (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "rm"}}),
                            "tool_choice", ["'rm'", "get_weather, add"]),
    "tool-choice-without-tools": (dict(tool_choice="required"), "tool_choice", ["no tools"]),
    "tool-choice-word": (dict(tools=TOOLS, tool_choice="always"), "tool_choice", ["tool_choice"]),
    "required-and-response-format": (dict(tools=TOOLS, tool_choice="required",
                                          response_format={"type": "json_object"}), "response_format", ["tool_choice"]),
    "unusable-schema": (dict(tools=[tool("f", {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}})],
                             tool_choice="required"), "tools", ["f"]),
    "tool-turn-without-id": (dict(messages=[{"role": "tool", "content": "3"}]), "messages", ["tool_call_id"]),
    "arguments-not-json": (dict(messages=[{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]), "messages", ["'c'"]),
    "null-user-content": (dict(messages=[{"role": "user", "content": None}]), "messages", ["null"]),
    "functions": (dict(functions=[{"name": "f"}]), "functions", ["use tools"]),
    "function_call": (dict(function_call="auto"), "function_call", ["use tool_choice"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_bad_tool_request_is_refused_naming_the_field(server, case):
    fields, param, words = REFUSED[case]
    reply = call(server.url, "POST", "/v1/chat/completions", chat(**fields))
    assert reply.status == 400, reply.body[:500]
    error = reply.error
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], (word, error["message"])


def tiny_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("parser", list(TOOL_CALL_FORMATS))
def test_required_forces_valid_calls_in_every_format(server, parser):
    server.state.settings.tool_call_parser = parser
    try:
        done = tiny_client(server).chat.completions.create(model=MODEL_NAME, messages=chat()["messages"], tools=TOOLS,
                                                           tool_choice="required", temperature=0, max_tokens=120)
    finally:
        server.state.settings.tool_call_parser = "hermes"
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    for made in choice.message.tool_calls:
        assert made.type == "function" and made.id.startswith("call_")
        jsonschema.validate(json.loads(made.function.arguments), SCHEMAS[made.function.name])


def test_a_named_function_is_called_once(server):
    done = tiny_client(server).chat.completions.create(
        model=MODEL_NAME, messages=chat()["messages"], tools=TOOLS, temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "add"}})
    made = done.choices[0].message.tool_calls
    assert [c.function.name for c in made] == ["add"]
    jsonschema.validate(json.loads(made[0].function.arguments), ADD)


def test_streamed_calls_accumulate_to_the_whole_answer(server):
    api = tiny_client(server)
    request = dict(model=MODEL_NAME, messages=chat()["messages"], tools=TOOLS, tool_choice="required",
                   temperature=0, max_tokens=120)
    whole = api.chat.completions.create(**request).choices[0]
    with api.chat.completions.stream(**request) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert (streamed.message.content or None) == whole.message.content


SCRIPTED = {  # parser -> an answer in its format: under auto the answer is free, here scripted by a one-string choice
    "hermes": ('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', "Sure."),
    "llama3_json": ('{"name": "add", "parameters": {"a": 1, "b": 2}}', None),
    "mistral": ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]', None),
}


@pytest.mark.parametrize("parser", SCRIPTED)
def test_auto_reads_the_calls_in_a_free_answer_whole_and_streamed(server, parser):
    answer, content = SCRIPTED[parser]
    request = dict(model=MODEL_NAME, messages=chat()["messages"], tools=TOOLS, temperature=0, max_tokens=100,
                   extra_body={"structured_outputs": {"choice": [answer]}})
    server.state.settings.tool_call_parser = parser
    try:
        whole = tiny_client(server).chat.completions.create(**request).choices[0]
        with tiny_client(server).chat.completions.stream(**request) as stream:
            for _ in stream:
                pass
            streamed = stream.get_final_completion().choices[0]
    finally:
        server.state.settings.tool_call_parser = "hermes"
    for choice in (whole, streamed):
        assert choice.finish_reason == "tool_calls"
        assert (choice.message.content or None) == content
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == \
            [("add", {"a": 1, "b": 2})]


# ---- a round trip on the default model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(smollm_path):
    with ServerThread(smollm_path, max_model_len=1024) as running:
        yield running


CITY_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}


def test_a_tool_call_round_trip_through_the_openai_client(smollm):
    api = tiny_client(smollm)
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    asked = api.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[CITY_WEATHER],
                                        tool_choice="required", parallel_tool_calls=False, temperature=0,
                                        max_tokens=60)
    choice = asked.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [made] = choice.message.tool_calls
    assert made.function.name == "get_weather"
    jsonschema.validate(json.loads(made.function.arguments), CITY_WEATHER["function"]["parameters"])
    messages += [choice.message,  # the client sends the response's message back as it is
                 {"role": "tool", "tool_call_id": made.id, "content": json.dumps({"celsius": 18, "sky": "clear"})}]
    final = api.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[CITY_WEATHER], temperature=0,
                                        max_tokens=40).choices[0]
    assert final.message.content and not final.message.tool_calls
    assert final.finish_reason in ("stop", "length")


def test_a_named_function_on_the_default_model(smollm):
    adder = {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                              "parameters": ADD}}
    done = tiny_client(smollm).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "What is 2 plus 3?"}], tools=[CITY_WEATHER, adder],
        tool_choice={"type": "function", "function": {"name": "add"}}, temperature=0, max_tokens=40)
    [made] = done.choices[0].message.tool_calls
    assert made.function.name == "add"
    jsonschema.validate(json.loads(made.function.arguments), ADD)
