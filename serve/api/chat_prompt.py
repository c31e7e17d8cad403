"""A chat request as prompt token ids: the conversation rendered by the tokenizer's chat template, the assistant's
turn opened.

Tools, and the tool turns of the history, are rendered by the template itself when it knows tools (it writes a
probe tool's name when given one: Qwen, Llama 3.1, Mistral, Hermes). A template without tool support, such as the
default model's ChatML, gets them in Hermes' form (as Qwen 2.5 writes it):

    system     the system message's text, then "# Tools", the tools as JSON lines inside <tools></tools>, and how
               to answer with a call in the --tool-call-parser's format; a system message of its own if none leads
    assistant  its text, then its calls as that format writes them (hermes: <tool_call> blocks)
    tool       a user turn of <tool_response>\\n...\\n</tool_response>, consecutive tool results in one turn
"""

from __future__ import annotations

import functools
import json

from .errors import bad_request
from .generation import tokenize
from .schemas import ChatCompletionRequest, ChatMessage
from .state import ServerState
from .tool_calls import ToolUse
from .tool_parsers import ParsedCall

TOOLS_PROMPT = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n"
                "<tools>\n{tools}\n</tools>\n\n{how_to_call}")

_PROBE_TOOL = {"type": "function", "function": {"name": "loradock_probe_tool", "description": "a probe",
                                                "parameters": {"type": "object", "properties": {}}}}


def chat_prompt(state: ServerState, body: ChatCompletionRequest, use: ToolUse) -> list[int]:
    tokenizer = state.engine.tokenizer
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise bad_request("this model's tokenizer has no chat template: use /v1/completions with a plain prompt",
                          code="no_chat_template")
    if renders_tools(tokenizer, template):
        messages, tools = [_native(m) for m in body.messages], list(use.offered) or None
    else:
        messages, tools = _with_tools_in_text(body.messages, use), None
    try:
        rendered = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # the template itself rejects the conversation (jinja raise_exception)
        raise bad_request(f"the chat template refused the messages: {exc}", code="invalid_messages") from None
    ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    return tokenize(state, list(ids))


@functools.lru_cache(maxsize=8)
def renders_tools(tokenizer, template: str) -> bool:
    """Whether the chat template renders tools given to it (keyed by the template too: it may be replaced)."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[_PROBE_TOOL],
                                             add_generation_prompt=True, tokenize=False)
    except Exception:  # a template that refuses tools does not render them
        return False
    return _PROBE_TOOL["function"]["name"] in text


def _native(message: ChatMessage) -> dict:
    """A message as templates with tools read it: a call's arguments as an object (they write it with tojson)."""
    rendered: dict = {"role": message.role, "content": message.text or ""}
    if message.tool_calls:
        rendered["tool_calls"] = [{"id": call.id, "type": "function",
                                   "function": {"name": parsed.name, "arguments": json.loads(parsed.arguments)}}
                                  for call, parsed in zip(message.tool_calls, _calls(message))]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


def _with_tools_in_text(messages: list[ChatMessage], use: ToolUse) -> list[dict]:
    rendered: list[dict] = []
    results = False  # the last turn holds tool results
    for message in messages:
        if message.role == "tool":
            response = f"<tool_response>\n{message.text}\n</tool_response>"
            if results:
                rendered[-1]["content"] += "\n" + response
            else:
                rendered.append({"role": "user", "content": response})
            results = True
            continue
        results = False
        if message.tool_calls:
            calls = use.format.write(_calls(message))
            rendered.append({"role": "assistant", "content": f"{message.text}\n{calls}" if message.text else calls})
        else:
            rendered.append({"role": message.role, "content": message.text})
    if use.offered:
        tools = TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in use.offered),
                                    how_to_call=use.format.how_to_call)
        if rendered[0]["role"] in ("system", "developer"):
            rendered[0]["content"] = f"{rendered[0]['content']}\n\n{tools}"
        else:
            rendered.insert(0, {"role": "system", "content": tools})
    return rendered


def _calls(message: ChatMessage) -> list[ParsedCall]:
    """An assistant turn's calls; their arguments must be the JSON text of an object."""
    calls = []
    for call in message.tool_calls or ():
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise bad_request(f"the arguments of the tool call {call.id!r} are not the JSON text of an object",
                              param="messages")
        calls.append(ParsedCall(call.function.name, call.function.arguments))
    return calls
