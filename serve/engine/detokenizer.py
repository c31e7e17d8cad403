"""Token ids to text, one token at a time, and stop strings.

Decoding a token alone is wrong for byte-level and sentencepiece vocabularies (a character may span
tokens, spaces depend on the neighbour), so each new token is decoded together with a few tokens before
it and only the new, complete characters are emitted. Text that could be the start of a stop string is
held back until it is known not to be one.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

# A window of already-emitted tokens decoded again with each new token so merges at the seam come out right.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = len(self.ids)  # tokens before this are already emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be empty)."""
        self.ids.append(token_id)
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        current = self._decode(self.ids[self.prefix_offset :])
        if len(current) <= len(emitted) or current.endswith("\ufffd"):
            return ""  # an incomplete character: wait for more tokens
        self.prefix_offset = max(self.read_offset - _CONTEXT_TOKENS, 0)
        self.read_offset = len(self.ids)
        if self.prefix_offset > 4 * _CONTEXT_TOKENS:  # keep the window small
            del self.ids[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        return current[len(emitted) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


@dataclass
class StopMatch:
    text: str  # text safe to emit now
    stopped: bool


class StopStringMatcher:
    """Finds the first stop string in a stream of text deltas; the stop string itself is not emitted."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""  # text held back: it ends with a prefix of some stop string

    def feed(self, delta: str) -> StopMatch:
        if not self.stops:
            return StopMatch(delta, False)
        text = self.pending + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return StopMatch(text[: min(hits)], True)
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - keep :] if keep else ""
        return StopMatch(text[: len(text) - keep], False)

    def flush(self) -> str:
        """Held-back text, released when the request ends without a stop string."""
        text, self.pending = self.pending, ""
        return text
