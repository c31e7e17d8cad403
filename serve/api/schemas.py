"""Request and response bodies (pydantic). Requests are validated at the edge; a bad one never reaches the engine.

Unknown request fields are ignored, as OpenAI-compatible servers do, so clients that send extra options work.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


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

    @model_validator(mode="after")
    def _check_stop(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 8 or any(not s for s in stops):
            raise ValueError("stop takes at most 8 non-empty strings")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | Annotated[list[TokenId], Field(min_length=1)] = Field(
        description="the prompt as a string, or as a list of token ids"
    )
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20, description="top alternatives per token")
    echo: StrictBool = Field(default=False, description="the prompt before the completion, in the text and (with "
                             "logprobs) the token log-probabilities: the first prompt token's is null")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    path: StrictStr | None = Field(default=None, description="default: the adapter directory / name")


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


