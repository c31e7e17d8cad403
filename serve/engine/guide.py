"""What a request's output must match: a JSON schema, any JSON object, a regular expression, one of a list of
strings, or an EBNF grammar. Plain data (it travels to replicas inside SamplingParams); `grammar.py` compiles it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GuideKind = Literal["json", "json_object", "regex", "choice", "grammar"]

MAX_GUIDE_CHARS = 64 * 1024  # a larger schema or grammar is refused before compiling: compile time grows with it


class Guide(BaseModel):
    """kind json: `spec` is the JSON schema's text; json_object: any JSON object (`spec` empty); regex: the pattern;
    choice: a JSON array of the allowed strings; grammar: EBNF (GBNF, as llama.cpp and xgrammar read it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: GuideKind
    spec: str = Field(default="", max_length=MAX_GUIDE_CHARS)
