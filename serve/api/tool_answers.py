"""Tool calls read out of an answer: whole, or as it streams, with the same result.

Without calls the content is the text as generated. With calls it is the text outside them, its trailing whitespace
dropped (the newlines between and after calls), null if nothing is left. A stream releases content and calls as
soon as they are final (`Split`): text that may still become a call is held back, and so is trailing whitespace
until more content follows, so that what a client accumulates equals the whole answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .tool_calls import ToolUse
from .tool_parsers import ParsedCall, Split


@dataclass
class Answer:
    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)


def read_answer(text: str, use: ToolUse) -> Answer:
    """The whole answer's content and calls."""
    content, calls = _parts(use.format.split(text, use.names, final=True), use.max_calls)
    if not calls:
        return Answer(content)
    return Answer(content.rstrip() or None, calls)


class StreamedAnswer:
    """Feed the text deltas; each feed gives the content and the calls that became final with it."""

    def __init__(self, use: ToolUse):
        self.use = use
        self.text = ""
        self.content_sent = 0  # characters of content released
        self.calls_sent = 0

    def feed(self, delta: str, final: bool) -> Answer:
        self.text += delta
        content, calls = _parts(self.use.format.split(self.text, self.use.names, final), self.use.max_calls)
        keep = len(content) if final and not calls else len(content.rstrip())
        released = Answer(content[self.content_sent : keep], calls[self.calls_sent :])
        self.content_sent = max(self.content_sent, keep)
        self.calls_sent = len(calls)
        return released


def _parts(split: Split, max_calls: int | None) -> tuple[str, list[ParsedCall]]:
    calls = [piece for piece in split.pieces if isinstance(piece, ParsedCall)]
    return "".join(piece for piece in split.pieces if isinstance(piece, str)), calls[:max_calls]
