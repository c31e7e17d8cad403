"""Training data: read JSONL rows, check them, and turn them into token ids with loss masks.

Two row shapes, one JSON object per line:

    {"prompt": "...", "completion": "..."}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}

Each row becomes exactly the tokens the server sees and then generates, so that what is trained is what is
served:

- prompt/completion: the prompt is tokenized as ``/v1/completions`` tokenizes it (``tokenizer(prompt)``, with
  the tokenizer's own BOS), then the completion alone (as the model generates it, one token after the
  prompt), then the end-of-sequence token.
- messages: every assistant turn is preceded by the conversation so far rendered as ``/v1/chat/completions``
  renders it (``apply_chat_template(..., add_generation_prompt=True)``), and trained up to and including the
  first token of the template's turn end that the server stops on (``<|end|>``, ``<|im_end|>``, ...). If the
  template closes a turn with no such token, the model's EOS is trained after the turn instead (with a warning),
  so that the served adapter stops.

Labels are -100 (no loss) everywhere except on completion / assistant tokens and their end token. A row that is
not valid is reported as ``file:line: what is wrong``; every bad row is listed before anything trains.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("loradock.train")

IGNORE = -100  # the label of a token that carries no loss (transformers' convention)
_SHOWN_ERRORS = 20  # bad rows listed in one DataError
T = TypeVar("T")


class DataError(ValueError):
    """The training data cannot be used; the message names the file and the lines."""


@dataclass(frozen=True)
class Example:
    """One tokenized row: ``labels[i]`` is ``input_ids[i]`` where the token is trained, else IGNORE."""

    input_ids: list[int]
    labels: list[int]
    source: str  # "file:line"

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass(frozen=True)
class DataStats:
    """What the report says about a set of encoded examples."""

    examples: int
    tokens: int
    trained_tokens: int
    max_tokens: int
    mean_tokens: float

    @classmethod
    def of(cls, examples: Sequence[Example]) -> DataStats:
        lengths = [len(e.input_ids) for e in examples]
        return cls(
            examples=len(examples),
            tokens=sum(lengths),
            trained_tokens=sum(e.trained_tokens for e in examples),
            max_tokens=max(lengths, default=0),
            mean_tokens=round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
        )


class RowEncoder:
    """Turns rows into Examples for one tokenizer and the server's set of stop token ids."""

    def __init__(self, tokenizer, stop_ids: frozenset[int]):
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stop_ids, default=None)
        if eos is None:
            raise DataError("the model has no end-of-sequence token: a trained adapter would never stop")
        self.eos_id = eos
        # The text of each stop token, to find where the chat template closes an assistant turn.
        self._stop_texts = [t for t in tokenizer.convert_ids_to_tokens(sorted(stop_ids)) if t]
        self._warned_no_turn_end = False

    def encode(self, row: dict, source: str) -> Example:
        """The Example for a row already checked by ``check_row``. Raises ValueError if the template refuses it."""
        if "messages" in row:
            return self._encode_chat(row["messages"], source)
        prompt = self._ids(row["prompt"], add_special_tokens=True)
        completion = self._ids(row["completion"]) + [self.eos_id]
        return Example(prompt + completion, [IGNORE] * len(prompt) + completion, source)

    def _encode_chat(self, messages: list[dict], source: str) -> Example:
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"{source}: a \"messages\" row needs a chat template, and the model's tokenizer has none: "
                            "use prompt/completion rows")
        ids: list[int] = []
        labels: list[int] = []
        done = ""  # the rendered text already turned into tokens
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._render(messages[:turn], add_generation_prompt=True)
            full = self._render(messages[: turn + 1], add_generation_prompt=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise ValueError(
                    "the chat template does not render the conversation incrementally (a later render does not "
                    "start with an earlier one), so its assistant turns cannot be found"
                )
            context = self._ids(prefix[len(done) :])
            reply, end = self._assistant_span(full[len(prefix) :], message["content"])
            trained = self._ids(reply) + ([] if end else [self.eos_id])
            ids += context + trained
            labels += [IGNORE] * len(context) + trained
            done = prefix + reply
        return Example(ids, labels, source)

    def _assistant_span(self, text: str, content: str) -> tuple[str, bool]:
        """The assistant's text up to and including the template's first stop token after the content, and
        whether there was one."""
        start = text.find(content) + len(content) if content and content in text else 0
        ends = [(text.find(stop, start), stop) for stop in self._stop_texts if stop in text[start:]]
        if ends:
            position, stop = min(ends)
            return text[: position + len(stop)], True
        if not self._warned_no_turn_end:
            log.warning(
                "the chat template closes an assistant turn with no token the server stops on (%s); training "
                "%r after each assistant turn so that the adapter stops",
                ", ".join(self._stop_texts),
                self.tokenizer.convert_ids_to_tokens(self.eos_id),
            )
            self._warned_no_turn_end = True
        return text, False

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        # The same call the server makes (serve/api/chat_prompt.py), untokenized; the server's
        # tokenize=True is tokenizer(text, add_special_tokens=False), as in _ids.
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _ids(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids) if text else []


def check_row(row: object) -> str | None:
    """What is wrong with a parsed JSONL row's shape, or None."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, not {type(row).__name__}"
    if "messages" in row:
        if "prompt" in row or "completion" in row:
            return 'a row has either "messages" or "prompt" and "completion", not both'
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return '"messages" must be a non-empty list'
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
                message.get("content"), str
            ):
                return f'messages[{index}] must be an object with string "role" and "content"'
        if not any(message["role"] == "assistant" for message in messages):
            return "the conversation has no assistant message: nothing to train on"
        return None
    if "prompt" not in row or "completion" not in row:
        return 'a row needs "prompt" and "completion", or "messages"'
    if not isinstance(row["prompt"], str) or not row["prompt"]:
        return '"prompt" must be a non-empty string'
    if not isinstance(row["completion"], str):
        return '"completion" must be a string'
    return None


class BadRow(ValueError):
    """What is wrong with one row; ``read_rows`` puts the file and line in front."""


def read_rows(path: Path, convert: Callable[[object, str], T]) -> list[T]:
    """``convert(row, "file:line")`` for every non-empty line of a JSONL file, in order. Raises DataError listing
    every line that is not JSON or that ``convert`` refuses with BadRow (file:line: why), or saying the file holds
    no rows."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    errors, converted = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            errors.append(f"{source}: not valid JSON: {exc}")
            continue
        try:
            converted.append(convert(row, source))
        except BadRow as exc:
            errors.append(f"{source}: {exc}")
    if errors:
        shown = "\n  ".join(errors[:_SHOWN_ERRORS])
        more = f"\n  ... and {len(errors) - _SHOWN_ERRORS} more" if len(errors) > _SHOWN_ERRORS else ""
        raise DataError(f"{len(errors)} bad row(s) in {path}:\n  {shown}{more}")
    if not converted:
        raise DataError(f"{path} holds no rows")
    return converted


def check_rows(path: Path, check: Callable[[object], str | None]) -> None:
    """Raise DataError listing every row of a JSONL file whose shape ``check`` finds wrong (file:line: why): a first
    look that needs no tokenizer, before the model loads."""

    def checked(row: object, source: str) -> None:
        problem = check(row)
        if problem is not None:
            raise BadRow(problem)

    read_rows(path, checked)


def encode_row(encoder: RowEncoder, row: object, source: str) -> Example:
    """A training row checked and encoded; raises BadRow saying what is wrong with it."""
    problem = check_row(row)
    if problem is not None:
        raise BadRow(problem)
    try:
        return encoder.encode(row, source)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - the chat template's own refusal (jinja raise_exception), or ours
        raise BadRow(f"cannot render the conversation with the model's chat template: {exc}") from None


def drop_too_long(items: list[T], length: Callable[[T], int], path: Path, max_seq_len: int) -> tuple[list[T], int]:
    """The items of at most ``max_seq_len`` tokens, and how many were left out (with a warning: cutting them would
    cut off the end token). Each item has a ``source`` ("file:line")."""
    too_long = [f"{item.source} ({length(item)} tokens)" for item in items if length(item) > max_seq_len]
    if too_long:
        log.warning(
            "%d row(s) of %s are longer than --max-seq-len %d and are left out: %s%s",
            len(too_long), path, max_seq_len, ", ".join(too_long[:5]), " ..." if len(too_long) > 5 else "",
        )
    return [item for item in items if length(item) <= max_seq_len], len(too_long)


def load_examples(path: Path, encoder: RowEncoder, max_seq_len: int) -> tuple[list[Example], int]:
    """Every row of a JSONL file encoded, and how many rows were left out for being longer than ``max_seq_len``
    tokens. Raises DataError listing every bad row (file:line: why)."""
    examples = read_rows(path, lambda row, source: encode_row(encoder, row, source))
    return drop_too_long(examples, lambda example: len(example.input_ids), path, max_seq_len)


def split_examples(examples: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A deterministic train/validation split: the same rows, fraction and seed always give the same split.
    At least one row goes to each side when there are two or more and the fraction is above 0."""
    if not 0 <= fraction < 1:
        raise DataError(f"--val-split must be in [0, 1), not {fraction}")
    count = 0 if fraction == 0 or len(examples) < 2 else min(len(examples) - 1, max(1, math.floor(len(examples) * fraction)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def require_labels(examples: Sequence[Example], what: str) -> None:
    """Fail before training when masking and the length limit leave nothing to learn."""
    if not any(e.trained_tokens for e in examples):
        raise DataError(
            f"{what} has no token to train on: every row is longer than --max-seq-len, or masking leaves no "
            f"completion / assistant token"
        )
