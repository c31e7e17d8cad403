"""What the answer must match, from the request: OpenAI's `response_format` or vLLM's `structured_outputs`, as the
engine's Guide. The engine compiles it (a guide that fails to compile is a 400 before the first token); here it
is checked for shape and size, and the error names the field."""

from __future__ import annotations

import json

from ..engine.guide import MAX_GUIDE_CHARS, Guide, GuideKind
from .errors import bad_request
from .schemas import JsonObjectFormat, JsonSchemaFormat, StructuredOutputs, _SamplingFields


def output_guide(body: _SamplingFields) -> tuple[Guide | None, str | None]:
    """The guide the request asks for, and the field that asks (errors about it name that field)."""
    if body.response_format is not None and body.structured_outputs is not None:
        raise bad_request("give response_format or structured_outputs, not both", param="structured_outputs")
    if body.structured_outputs is not None:
        return _structured_outputs(body.structured_outputs), "structured_outputs"
    if isinstance(body.response_format, JsonObjectFormat):
        return Guide(kind="json_object"), "response_format"
    if isinstance(body.response_format, JsonSchemaFormat):
        schema = body.response_format.json_schema.json_schema
        if schema is None:  # a name without a schema: any JSON object
            return Guide(kind="json_object"), "response_format"
        return _guide("json", json.dumps(schema), "response_format"), "response_format"
    return None, None  # absent, or {"type": "text"}


def _structured_outputs(asked: StructuredOutputs) -> Guide:
    field = "structured_outputs"
    if asked.json_schema is not None:
        schema = asked.json_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise bad_request(f"structured_outputs.json is not JSON: {exc}", param=field) from None
        if not isinstance(schema, dict):
            raise bad_request("structured_outputs.json must be a JSON schema: a JSON object", param=field)
        return _guide("json", json.dumps(schema), field)
    if asked.regex is not None:
        return _guide("regex", asked.regex, field)
    if asked.choice is not None:
        return _guide("choice", json.dumps(asked.choice), field)
    if asked.grammar is not None:
        return _guide("grammar", asked.grammar, field)
    return Guide(kind="json_object")


def _guide(kind: GuideKind, spec: str, field: str) -> Guide:
    if len(spec) > MAX_GUIDE_CHARS:
        raise bad_request(f"the {field} {kind} is {len(spec)} characters, more than {MAX_GUIDE_CHARS}: too large "
                          "to compile", param=field)
    return Guide(kind=kind, spec=spec)
