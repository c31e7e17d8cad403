"""Request and response bodies (pydantic). Requests are validated at the edge; a bad one never reaches the engine.

Unknown request fields are ignored, as OpenAI-compatible servers do, so clients that send extra options work. Every
field of OpenAI's own requests is declared: honoured, refused with a 400 naming it where loradock cannot give the
answer it asks for (`Refused`), or accepted as having no effect on the answer (`_no_effect`, each saying why).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from ...adapters.merge import METHODS

TokenId = Annotated[int, Field(ge=0)]


@dataclass(frozen=True)
class Refused:
    """Marks a field loradock cannot honour: a value outside `allowed` (absent and null always pass) is a 400 that
    says why; the OpenAPI description says so too."""

    why: str
    allowed: tuple = ()

    def __get_pydantic_core_schema__(self, source, handler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema, handler) -> dict:
        return {**handler(schema), "description": f"refused unless null: {self.why}"}

    def _check(self, value):
        if value is not None and value not in self.allowed:
            raise PydanticCustomError("unsupported_parameter", self.why)
        return value


def _no_effect(why: str) -> Any:
    """A field accepted whatever its value, because it does not change the answer; `why` documents it."""
    return Field(default=None, description=f"accepted, no effect: {why}")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


# ---- structured outputs -------------------------------------------------------------------------------------


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = Field(max_length=64, description="the schema's name (OpenAI's); not used in decoding")
    description: StrictStr | None = Field(default=None, description="what the answer is for; not used in decoding")
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema", description="the JSON schema the "
                                               "answer matches; absent: any JSON object")
    strict: StrictBool | None = Field(default=None, description="loradock always decodes to the schema exactly")


class TextFormat(BaseModel):
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]

class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of its constraints. Its other options (structural_tag, whitespace
    and fallback switches) change the answer and are not implemented: a 400 names them."""

    model_config = ConfigDict(extra="allow")
    json_schema: Any = Field(default=None, alias="json", description="a JSON schema, as an object or its text")
    regex: StrictStr | None = Field(default=None, description="a regular expression the whole answer matches")
    choice: Annotated[list[StrictStr], Field(min_length=1)] | None = Field(
        default=None, description="the answer is exactly one of these strings")
    grammar: StrictStr | None = Field(default=None, description="an EBNF grammar (GBNF, as xgrammar reads it)")
    json_object: StrictBool | None = Field(default=None, description="true: any JSON object")

    @model_validator(mode="after")
    def _one_constraint(self):
        others = sorted(k for k, v in (self.model_extra or {}).items() if v is not None)
        if others:
            raise PydanticCustomError("unsupported_parameter", "{others} not supported: give one of json, regex, "
                                      "choice, grammar, json_object", {"others": ", ".join(others)})
        values = {"json": self.json_schema, "regex": self.regex, "choice": self.choice, "grammar": self.grammar,
                  "json_object": self.json_object}
        given = [name for name, value in values.items() if value not in (None, False)]
        if len(given) != 1:
            raise PydanticCustomError("one_constraint", "give exactly one of json, regex, choice, grammar, "
                                      "json_object (got {given})", {"given": ", ".join(given) or "none"})
        return self


_USE_STRUCTURED_OUTPUTS = Refused("vLLM's guided_* fields are gone: use structured_outputs, e.g. "
                                   '{"structured_outputs": {"json": <schema>}} (or regex, choice, grammar)')


# ---- mixes of adapters ----------------------------------------------------------------------------------------
# The recipe's values (an empty list, twice a name, a weight that is not finite, a density outside its range) are
# checked by the mix itself (adapters/merge.py check_recipe), which names the field at fault.

MergeMethod = Literal[METHODS]


class MixSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(description="a loaded adapter")
    weight: float = Field(description="its weight in the mix: any finite number (a negative one subtracts it)")


class MergeSpec(BaseModel):
    """A named mix's recipe, as peft's add_weighted_adapter takes it."""

    model_config = ConfigDict(extra="forbid")
    adapters: list[MixSource] = Field(description="the adapters mixed and their weights (at least one)")
    method: MergeMethod = Field(default="linear", description="peft's combination_type")
    density: float | None = Field(default=None, description="the share of values kept, in (0, 1]: ties and dare_* "
                                  "only (ties takes 0 too)")
    seed: StrictInt = Field(default=0, ge=0, le=2**63 - 1, description="DARE's random masks (dare_* only)")


# ---- the fields both endpoints share ------------------------------------------------------------------------


def _logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    for token, bias in (value or {}).items():
        if not re.fullmatch(r"\d{1,10}", token):
            raise PydanticCustomError("logit_bias", "keys are token ids (decimal strings), not {token}",
                                      {"token": repr(token)})
        if not -100 <= bias <= 100:
            raise PydanticCustomError("logit_bias", "biases lie in [-100, 100], not {bias} (token {token})",
                                      {"bias": bias, "token": token})
    return value


class _SamplingFields(BaseModel):
    """Generation options shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr = Field(description="the served model name for the base model, or an adapter name")
    max_tokens: StrictInt | None = Field(default=None, ge=1, description="default: the rest of the context")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(default=0, ge=-1, description="0 or -1 disable top-k")
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**64 - 1, description="a 64-bit integer")
    stop: StrictStr | list[StrictStr] | None = Field(default=None, description="up to 8 stop strings")
    stop_token_ids: list[TokenId] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    return_token_ids: StrictBool = Field(default=False, description="add token_ids to each choice")
    n: StrictInt = Field(default=1, ge=1, le=1, description="only 1 is supported")
    cache_salt: StrictStr | None = Field(
        default=None, min_length=1, description="requests share cached prompt blocks only with requests of the same "
        "salt (vLLM's field); with tenants each tenant has its own salt besides",
    )
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="subtracted from the logit of every "
                                     "token already generated")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="subtracted once per time a token "
                                      "was already generated")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0, description="vLLM's: divides the positive "
                                       "(multiplies the negative) logits of tokens in the prompt or the output")
    min_tokens: StrictInt = Field(default=0, ge=0, description="vLLM's: no end of sequence before this many tokens")
    logit_bias: Annotated[dict[str, float] | None, AfterValidator(_logit_bias)] = Field(
        default=None, max_length=300, description="token id (as a string) -> bias in [-100, 100] added to its logit")
    response_format: ResponseFormat | None = Field(default=None, description="text, json_object or json_schema")
    structured_outputs: StructuredOutputs | None = Field(default=None, description="vLLM's: the answer matches a "
                                                         "JSON schema, a regex, a choice or a grammar")
    guided_json: Annotated[Any, _USE_STRUCTURED_OUTPUTS] = None
    guided_regex: Annotated[Any, _USE_STRUCTURED_OUTPUTS] = None
    guided_choice: Annotated[Any, _USE_STRUCTURED_OUTPUTS] = None
    guided_grammar: Annotated[Any, _USE_STRUCTURED_OUTPUTS] = None
    user: Any = _no_effect("an end-user id for the provider's abuse monitoring")
    adapters: list[MixSource] | None = Field(default=None, description="a mix of these adapters for this request "
                                             "(model names the base), made as peft's add_weighted_adapter makes it "
                                             "and kept for the next request with the same recipe")
    merge_method: MergeMethod | None = Field(default=None, description="the mix's method (default linear)")
    density: float | None = Field(default=None, description="the mix's density: ties and dare_* only")
    merge_seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1, description="the seed of DARE's masks "
                                         "(default 0)")

    @model_validator(mode="after")
    def _mix_options_need_a_mix(self):
        given = [k for k in ("merge_method", "density", "merge_seed") if getattr(self, k) is not None]
        if given and self.adapters is None:
            raise PydanticCustomError("mix_options", "{given} apply to a mix: give adapters too",
                                      {"given": ", ".join(given)})
        return self

    @model_validator(mode="after")
    def _check_stop(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 8 or any(not s for s in stops):
            raise ValueError("stop takes at most 8 non-empty strings")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def biases(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(token), bias) for token, bias in (self.logit_bias or {}).items())


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | Annotated[list[TokenId], Field(min_length=1)] = Field(
        description="the prompt as a string, or as a list of token ids"
    )
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20, description="top alternatives per token")
    echo: StrictBool = Field(default=False, description="the prompt before the completion, in the text and (with "
                             "logprobs) the token log-probabilities: the first prompt token's is null")
    best_of: StrictInt | None = Field(default=None, ge=1, le=1, description="only 1 is supported")
    suffix: Annotated[StrictStr | None, Refused("suffix (fill-in-the-middle) is not supported", ("",))] = None


# ---- chat messages and tools ----------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    arguments: StrictStr = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    """A call the assistant made, as OpenAI writes it in `message.tool_calls`."""

    model_config = ConfigDict(extra="ignore")
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[TextPart] | None = Field(
        description="a string, a list of text parts (joined), or null for an assistant turn that calls tools")
    tool_calls: list[ToolCall] | None = Field(default=None, description="an assistant turn's calls")
    tool_call_id: StrictStr | None = Field(default=None, description="a tool turn: the call it answers")

    @model_validator(mode="before")
    @classmethod
    def _assistant_content_optional(cls, data):
        if isinstance(data, dict) and data.get("role") == "assistant" and "content" not in data:
            return {**data, "content": None}
        return data

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value):
        """Parts other than text (image_url, input_audio, file, ...) are refused by name: the models read text."""
        for part in value if isinstance(value, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise PydanticCustomError("unsupported_content", "{kind} content parts are not supported: "
                                          "loradock's models read text parts only", {"kind": kind})
        return value

    @model_validator(mode="after")
    def _role_fields(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("content", "content may be null only in an assistant turn with tool_calls")
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("tool_calls", "only assistant turns carry tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise PydanticCustomError("tool_call_id", "a tool turn needs the tool_call_id of the call it answers")
        return self

    @property
    def text(self) -> str | None:
        """The content as one string: text parts joined."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = Field(description=f"matches {TOOL_NAME}")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema of type object; absent: "
                                              "no arguments")
    strict: StrictBool | None = Field(default=None, description="with tool_choice required or a named function "
                                      "the arguments always match the schema; under auto they are the model's")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not re.fullmatch(TOOL_NAME, name):
            raise PydanticCustomError("tool_name", "the tool name {name} must match {pattern}",
                                      {"name": repr(name), "pattern": TOOL_NAME})
        return name

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, schema: dict | None) -> dict | None:
        if schema is not None and schema.get("type", "object") != "object":
            raise PydanticCustomError("tool_parameters", "parameters must be a JSON schema of type object, not "
                                      "{type}", {"type": repr(schema.get("type"))})
        return schema

    @property
    def parameter_schema(self) -> dict:
        """The schema of the arguments: always of an object (OpenAI's parameters may leave the type out)."""
        return {"type": "object", **(self.parameters or {})}


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


def _unique_tool_names(tools: list[Tool] | None) -> list[Tool] | None:
    names = [tool.function.name for tool in tools or ()]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise PydanticCustomError("tool_names", "tool names must be unique: {names} given twice",
                                  {"names": ", ".join(twice)})
    return tools


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    tools: Annotated[list[Tool] | None, AfterValidator(_unique_tool_names)] = Field(
        default=None, max_length=128, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="default: auto with tools, none without")
    parallel_tool_calls: StrictBool = Field(default=True, description="false: at most one call per answer")
    functions: Annotated[Any, Refused("functions is deprecated: use tools")] = None
    function_call: Annotated[Any, Refused("function_call is deprecated: use tool_choice")] = None
    audio: Annotated[Any, Refused("audio output is not supported: loradock answers in text")] = None
    modalities: Annotated[Any, Refused('only the text modality is supported: ["text"]', (["text"],))] = None
    web_search_options: Annotated[Any, Refused("web search is not supported")] = None
    verbosity: Annotated[Any, Refused("verbosity is not supported: ask for brevity in the messages")] = None
    reasoning_effort: Annotated[Any, Refused("reasoning_effort is not supported: the models served here do not "
                                              "reason before answering")] = None
    metadata: Any = _no_effect("tags for the provider's stored-completions dashboard; loradock stores nothing")
    store: Any = _no_effect("loradock stores no completions")
    service_tier: Any = _no_effect("one tier: every request is served alike")
    prompt_cache_key: Any = _no_effect("the prefix cache finds shared prefixes by content (see cache_salt)")
    safety_identifier: Any = _no_effect("an end-user id for the provider's abuse monitoring")
    prediction: Any = _no_effect("a predicted output speeds up OpenAI's decoding; it never changes the answer")


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    path: StrictStr | None = Field(default=None, description="default: the adapter directory / name")
    merge: MergeSpec | None = Field(default=None, description="a mix of loaded adapters instead of a path")

    @model_validator(mode="after")
    def _path_or_merge(self):
        if self.path is not None and self.merge is not None:
            raise PydanticCustomError("path_or_merge", "give a path or a merge recipe, not both")
        return self


class VllmLoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: StrictStr
    lora_path: StrictStr


class VllmUnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: StrictStr


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


