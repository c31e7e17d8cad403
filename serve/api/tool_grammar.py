"""The grammar that forces tool calls (tool_choice "required" or a named function): EBNF whose top rule is the
format's layout of calls (`ToolCallFormat.grammar_root`) and whose call rule is the JSON of one call,
{"name": <one of the functions>, <arguments key>: <that function's parameters>}.

The call rule comes from xgrammar's JSON-schema converter, given one schema: an anyOf of one object per function
whose `name` is a const and whose arguments are the function's parameter schema. Each parameter schema's own
references ("#/$defs/...", "#") are rebased to where it now sits in that document. The converter's root rule is
renamed to the call rule; nothing refers to the root, the rebased references point below it.
"""

from __future__ import annotations

import asyncio
import json
import re

import xgrammar

from ..engine.grammar import bounded_strings_as_patterns
from ..engine.guide import MAX_GUIDE_CHARS, Guide
from .errors import bad_request
from .schemas import FunctionDefinition
from .tool_calls import ToolUse
from .tool_parsers import ToolCallFormat

CALL_RULE = "loradock_tool_call"


async def forced_calls_guide(use: ToolUse) -> Guide:
    """The guide of a request whose tool_choice forces calls; built off the event loop, as the conversion of the
    parameter schemas grows with them."""
    grammar = await asyncio.to_thread(tool_call_grammar, list(use.forced), use.format, parallel=use.max_calls is None)
    return Guide(kind="grammar", spec=grammar)


def tool_call_grammar(functions: list[FunctionDefinition], format: ToolCallFormat, parallel: bool) -> str:
    """EBNF text forcing calls of `functions` in `format`: one call, or (parallel) one or more."""
    try:
        converted = _json_rule(_calls_schema(functions, format))
    except RuntimeError as exc:  # a parameter schema the converter refuses: find and name the function
        raise bad_request(f"the tools' parameters cannot be decoded to: {_which(functions, format) or _reason(exc)}",
                          code="invalid_tool", param="tools") from None
    root = re.sub(r"^root ::=", f"{CALL_RULE} ::=", converted, count=1, flags=re.MULTILINE)
    grammar = f"{root}\nroot ::= {format.grammar_root(CALL_RULE, parallel)}\n"
    if len(grammar) > MAX_GUIDE_CHARS:
        raise bad_request(f"the tools' parameter schemas make a grammar of {len(grammar)} characters, more than "
                          f"{MAX_GUIDE_CHARS}: offer fewer or smaller tools", code="invalid_tool", param="tools")
    return grammar


def _calls_schema(functions: list[FunctionDefinition], format: ToolCallFormat) -> dict:
    if len(functions) == 1:
        return _call_schema(functions[0], format, "#")
    return {"anyOf": [_call_schema(f, format, f"#/anyOf/{i}") for i, f in enumerate(functions)]}


def _call_schema(function: FunctionDefinition, format: ToolCallFormat, at: str) -> dict:
    key = format.arguments_key
    # length-bounded strings as patterns, as the engine compiles schemas (xgrammar #800: see grammar.py)
    arguments = _rebased(bounded_strings_as_patterns(function.parameter_schema), f"{at}/properties/{key}")
    return {"type": "object", "properties": {"name": {"const": function.name}, key: arguments},
            "required": ["name", key], "additionalProperties": False}


def _rebased(node: object, base: str) -> object:
    """`node` with every local reference ("#...") made relative to `base` instead of the document's root."""
    if isinstance(node, dict):
        return {key: base + value[1:] if key == "$ref" and isinstance(value, str) and value.startswith("#")
                else _rebased(value, base) for key, value in node.items()}
    if isinstance(node, list):
        return [_rebased(item, base) for item in node]
    return node


def _json_rule(schema: dict) -> str:
    # compact separators, as models write JSON and as the history renders calls; no free whitespace to wander in
    return str(xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))


def _which(functions: list[FunctionDefinition], format: ToolCallFormat) -> str | None:
    for function in functions:
        try:
            _json_rule(_call_schema(function, format, "#"))
        except RuntimeError as exc:
            return f"{function.name}: {_reason(exc)}"
    return None


def _reason(exc: RuntimeError) -> str:
    """xgrammar's message without its log prefix ("[12:00:00] /path/file.cc:123: ")."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip().splitlines()[0])
