"""How a model family writes tool calls in its answer (`--tool-call-parser`): reading them out of the text, writing
them into a conversation's history, and the grammar's top rule that forces them.

    hermes       <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, one block per call; text before is
                 content (Hermes 2 Pro, Qwen 2.5 and 3)
    llama3_json  {"name": ..., "parameters": {...}}, the whole answer, optionally after <|python_tag|>; several
                 calls joined by ";" (Llama 3.1 and later, JSON-based tool calling)
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]; the marker is a special token that the
                 decoded text may have lost, so an answer that is such an array from its start counts as well

A call whose JSON does not parse, or that names a function the request did not offer, stays content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # the arguments object as JSON text


@dataclass
class Split:
    """An answer's text cut into content and calls, in order, every piece final: more text never changes them (a
    stream releases them at once). `pending` is a tail that may still become a call; at the end there is none."""

    pieces: list[str | ParsedCall] = field(default_factory=list)
    pending: str = ""


def read_call(obj: object, tools: frozenset[str], argument_keys: tuple[str, ...]) -> ParsedCall | None:
    """{"name": one of `tools`, <argument key>: an object, or its JSON text} as a call; None if it is not one."""
    if not isinstance(obj, dict) or obj.get("name") not in tools:
        return None
    arguments = next((obj[key] for key in argument_keys if key in obj), {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _decode(text: str, at: int) -> tuple[object, int] | None:
    """The JSON value starting at `at` (after whitespace) and where it ends; None if it is incomplete or invalid."""
    try:
        return _DECODER.raw_decode(text, _skip_space(text, at))
    except json.JSONDecodeError:
        return None


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def _partial_marker(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker` (0 if none)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolCallFormat:
    """One family's way of writing calls. `split` reads them; `write` renders calls into a history turn;
    `grammar_root` is the EBNF rule that forces one call (or several) given the rule of one call's JSON, whose
    arguments sit under `arguments_key`."""

    name: str
    arguments_key: str
    how_to_call: str  # the answer format, as the tool-use system prompt teaches it (templates without tools)

    def split(self, text: str, tools: frozenset[str], final: bool) -> Split:
        raise NotImplementedError

    def write(self, calls: list[ParsedCall]) -> str:
        raise NotImplementedError

    def grammar_root(self, call: str, parallel: bool) -> str:
        raise NotImplementedError

    def _call_json(self, call: ParsedCall) -> str:
        return json.dumps({"name": call.name, self.arguments_key: json.loads(call.arguments)}, ensure_ascii=False)


class HermesFormat(ToolCallFormat):
    name = "hermes"
    arguments_key = "arguments"
    how_to_call = ("For each function call, return a json object with function name and arguments within "
                   "<tool_call></tool_call> XML tags:\n<tool_call>\n"
                   '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def split(self, text: str, tools: frozenset[str], final: bool) -> Split:
        split, at = Split(), 0
        while True:
            start = text.find(self.OPEN, at)
            if start < 0:
                held = 0 if final else _partial_marker(text[at:], self.OPEN)
                split.pieces.append(text[at : len(text) - held])
                split.pending = text[len(text) - held :]
                break
            split.pieces.append(text[at:start])
            end = text.find(self.CLOSE, start)
            if end < 0 and not final:
                split.pending = text[start:]
                break
            # a block the answer ended in without closing it is still read: models stop at end-of-turn early
            stop = len(text) if end < 0 else end + len(self.CLOSE)
            inner = text[start + len(self.OPEN) : end if end >= 0 else len(text)]
            try:
                call = read_call(json.loads(inner), tools, ("arguments",))
            except json.JSONDecodeError:
                call = None
            split.pieces.append(call or text[start:stop])
            at = stop
        split.pieces = [piece for piece in split.pieces if piece != ""]
        return split

    def write(self, calls: list[ParsedCall]) -> str:
        return "\n".join(f"{self.OPEN}\n{self._call_json(call)}\n{self.CLOSE}" for call in calls)

    def grammar_root(self, call: str, parallel: bool) -> str:
        block = rf'"{self.OPEN}\n" {call} "\n{self.CLOSE}"'
        return f'{block} ("\\n" {block})*' if parallel else block


class Llama3JsonFormat(ToolCallFormat):
    name = "llama3_json"
    arguments_key = "parameters"
    how_to_call = ("To call functions, respond with nothing but JSON in the format "
                   '{"name": <function-name>, "parameters": <args-json-object>}; join several calls with "; ".')
    TAG = "<|python_tag|>"

    def split(self, text: str, tools: frozenset[str], final: bool) -> Split:
        lead = _skip_space(text, 0)
        head = text[lead:]
        if head.startswith(self.TAG):
            at = lead + len(self.TAG)
        elif head.startswith("{"):
            at = lead
        elif not final and self.TAG.startswith(head):  # nothing yet, or the tag's first characters
            return Split(pending=text)
        else:
            return Split([text])
        calls: list[ParsedCall] = []
        while True:  # objects joined by ";"; the text after the last call is content
            decoded = _decode(text, at)
            call = read_call(decoded[0], tools, ("parameters", "arguments")) if decoded else None
            if call is None:  # not a call (an answer in JSON), or not complete yet (or nothing yet after ";")
                rest = text[at:]
                break
            calls.append(call)
            at = _skip_space(text, decoded[1])
            if at < len(text) and text[at] == ";":
                at += 1
            elif at < len(text) or final:
                rest = text[decoded[1] :]
                break
        if not calls:
            return Split([text]) if decoded is not None or final else Split(pending=text)
        if decoded is None and not final:
            return Split([text[:lead], *calls], pending=rest)
        return Split([text[:lead], *calls, rest])

    def write(self, calls: list[ParsedCall]) -> str:
        return "; ".join(self._call_json(call) for call in calls)

    def grammar_root(self, call: str, parallel: bool) -> str:
        return f'{call} ("; " {call})*' if parallel else call


class MistralFormat(ToolCallFormat):
    name = "mistral"
    arguments_key = "arguments"
    how_to_call = ('To call functions, respond with [TOOL_CALLS] followed by a JSON array of calls: '
                   '[TOOL_CALLS][{"name": <function-name>, "arguments": <args-json-object>}]')
    MARKER = "[TOOL_CALLS]"

    def split(self, text: str, tools: frozenset[str], final: bool) -> Split:
        split, at = Split(), 0
        while True:
            marker = text.find(self.MARKER, at)
            lead = _skip_space(text, at)
            if marker >= 0:
                start, array = marker, marker + len(self.MARKER)
            elif at == 0 and text[lead:].startswith("["):  # the marker was a special token, dropped when decoded
                start = array = lead
            elif at == 0 and lead == len(text) and not final:  # only whitespace yet: an array may follow
                split.pending = text
                break
            else:
                held = 0 if final else _partial_marker(text[at:], self.MARKER)
                split.pieces.append(text[at : len(text) - held])
                split.pending = text[len(text) - held :]
                break
            split.pieces.append(text[at:start])
            decoded = _decode(text, array)
            if decoded is None:
                if final:
                    split.pieces.append(text[start:])
                else:
                    split.pending = text[start:]
                break
            value, at = decoded
            calls = [read_call(item, tools, ("arguments",)) for item in value] if isinstance(value, list) else []
            split.pieces.extend(calls if calls and all(calls) else [text[start:at]])
        split.pieces = [piece for piece in split.pieces if piece != ""]
        return split

    def write(self, calls: list[ParsedCall]) -> str:
        return self.MARKER + "[" + ", ".join(self._call_json(call) for call in calls) + "]"

    def grammar_root(self, call: str, parallel: bool) -> str:
        return f'"{self.MARKER}[" {call} (", " {call})* "]"' if parallel else f'"{self.MARKER}[" {call} "]"'


TOOL_CALL_FORMATS: dict[str, ToolCallFormat] = {
    f.name: f for f in (HermesFormat(), Llama3JsonFormat(), MistralFormat())
}
