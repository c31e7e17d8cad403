"""How `loradock eval` scores one answer against its reference: (correct, total) per row.

- exact: the stripped answer equals the stripped reference (1 unit per row).
- contains: the stripped reference occurs in the answer (1 unit per row).
- regex: ``re.search(pattern, answer.strip())`` finds a match (1 unit per row); anchor with ``^...$`` (or ``\\A`` and
  ``\\Z``) for a full match. The pattern is the row's own "pattern" field, else ``--pattern``.
- json-fields: the reference is a JSON object; the answer's first ``{...}`` that parses as a JSON object is
  compared field by field: one unit per field of the reference, correct when the answer has that key with an equal
  value (JSON equality: 1 == 1.0, key order ignored). An answer with no JSON object scores 0 of every field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

METRICS = ("exact", "contains", "regex", "json-fields")


@dataclass(frozen=True)
class Scored:
    """One row's result: `correct` of `total` units (rows for most metrics, fields for json-fields)."""

    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total


def score(metric: str, answer: str, reference: str, pattern: re.Pattern | None = None) -> Scored:
    """The answer's score under `metric`; `pattern` only for regex, the reference's JSON checked by
    ``reference_problem`` beforehand."""
    if metric == "exact":
        return Scored(int(answer.strip() == reference.strip()), 1)
    if metric == "contains":
        return Scored(int(reference.strip() in answer), 1)
    if metric == "regex":
        return Scored(int(pattern.search(answer.strip()) is not None), 1)
    if metric == "json-fields":
        expected = json.loads(reference)
        given = first_json_object(answer) or {}
        return Scored(sum(key in given and given[key] == value for key, value in expected.items()), len(expected))
    raise ValueError(f"unknown metric {metric!r}: one of {', '.join(METRICS)}")


def first_json_object(text: str) -> dict | None:
    """The first ``{...}`` in `text` that parses as a JSON object (text after it is ignored), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _end = decoder.raw_decode(text, start)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def reference_problem(metric: str, reference: str) -> str | None:
    """What makes a reference unusable for `metric`, or None."""
    if metric != "json-fields":
        return None
    try:
        expected = json.loads(reference)
    except ValueError:
        return "json-fields needs the reference answer to be a JSON object; it is not JSON"
    if not isinstance(expected, dict) or not expected:
        return "json-fields needs the reference answer to be a JSON object with at least one field"
    return None


def compile_pattern(pattern: str) -> re.Pattern:
    """`pattern` compiled; ValueError saying why not."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
