"""From a validated request to tokens: resolve the model, tokenize, admit, then stream or collect the result.

The two OpenAI endpoints differ only in how a prompt is built and how results are shaped; both go through
`Job` (one admitted request) and a `ResponseShape` (completions or chat).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from ...adapters.manager import UnknownAdapter
from ...adapters.peft_format import AdapterError
from ..engine import (BiasOutsideVocabulary, EngineShutdown, GenerationOutput, PromptTooLong, RequestError,
                      SamplingParams)
from ..engine.guide import Guide
from .backend import EngineLost
from .errors import APIError, bad_request, not_found
from .rate_limits import RateLimited
from .schemas import _SamplingFields
from .state import ServerState
from .tenants import Tenant


@dataclass
class Job:
    """One admitted request."""

    state: ServerState
    model: str
    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    tenant: Tenant | None = None  # with --tenants: whose limits, fair share and metrics the request counts in
    cache_salt: str | None = None  # the caller's own salt of the prefix cache
    guide_field: str | None = None  # the request field that asked for params.guide: a guide's errors name it
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # (token id, Logprobs) per generated token, when asked
    prompt_logprobs: tuple = ()  # Logprobs of prompt tokens 1.., when asked (echo)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    finish_reason: str | None = None

    @property
    def usage(self) -> dict:
        n = len(self.token_ids)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n, "total_tokens": len(self.prompt_ids) + n,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    @property
    def prefix_salt(self) -> str | None:
        """The request's salt in the prefix cache: its tenant's name and the caller's own salt, so that neither two
        tenants nor two salts of one tenant share cached blocks."""
        if self.tenant is None and self.cache_salt is None:
            return None
        return json.dumps([self.tenant.name if self.tenant is not None else None, self.cache_salt])


def resolve_model(state: ServerState, name: str, tenant: Tenant | None = None) -> str | None:
    """None for the base model, else the adapter's name (an adapter folder dropped into the directory included).
    A model the tenant may not use is answered exactly as one that does not exist."""
    adapter = None if name == state.settings.served_model_name else name
    try:
        if tenant is not None and not tenant.may_use(adapter):
            raise UnknownAdapter(name)
        if adapter is not None:
            state.engine.resolve_adapter(adapter)
        return adapter
    except UnknownAdapter:
        if tenant is not None:
            state.metrics.tenant_rejections.labels(tenant.name, "model_not_found").inc()
        raise not_found(
            f"the model {name!r} does not exist: GET /v1/models lists the base model and the adapters"
        ) from None
    except AdapterError as exc:
        raise adapter_refused(exc) from None


class RetryLater(APIError):
    """429 with Retry-After (whole seconds): a tenant over one of its limits."""

    def __init__(self, exc: RateLimited):
        super().__init__(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded")
        self.retry_after = max(1, math.ceil(exc.retry_after))

    def response(self) -> web.Response:
        response = super().response()
        response.headers["Retry-After"] = str(self.retry_after)
        return response


def adapter_refused(exc: AdapterError) -> APIError:
    return APIError(400, str(exc), type="invalid_request_error", code=f"adapter_{exc.code}")


def sampling_params(state: ServerState, body: _SamplingFields, prompt_len: int, max_tokens: int | None,
                    logprobs: int | None, prompt_logprobs: int | None = None,
                    guide: Guide | None = None) -> SamplingParams:
    room = state.engine.max_model_len - prompt_len
    max_tokens = max_tokens if max_tokens is not None else max(room, 1)
    if body.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({body.min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            seed=body.seed,
            stop=body.stops,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            logit_bias=body.biases,
            min_tokens=body.min_tokens,
            guide=guide,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def admit(state: ServerState, model: str, adapter: str | None, prompt_ids: list[int], params: SamplingParams,
          tenant: Tenant | None = None, cache_salt: str | None = None, guide_field: str | None = None) -> Job:
    """Check the request fits the context, the queue and the tenant's limits; count it in."""
    if state.shutting_down:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    try:
        state.engine.check_fits(prompt_ids, params)
    except PromptTooLong as exc:
        raise APIError(413, str(exc), code="context_length_exceeded", param="prompt") from None
    except BiasOutsideVocabulary as exc:
        raise bad_request(str(exc), param="logit_bias") from None
    except RequestError as exc:
        raise bad_request(str(exc), code="context_length_exceeded", param="max_tokens") from None
    if state.in_flight >= state.settings.max_queue:
        state.metrics.requests.labels(model, "rejected").inc()
        if tenant is not None:
            state.metrics.tenant_rejections.labels(tenant.name, "queue_full").inc()
        raise APIError(429, f"the server is busy: {state.in_flight} requests in flight (--max-queue)",
                       type="rate_limit_error", code="queue_full")
    if tenant is not None:
        try:
            state.limits.admit(tenant, len(prompt_ids) + params.max_tokens)
        except RateLimited as exc:
            state.metrics.requests.labels(model, "rejected").inc()
            state.metrics.tenant_rejections.labels(tenant.name, exc.reason).inc()
            raise RetryLater(exc) from None
    return Job(state, model, adapter, prompt_ids, params, tenant, cache_salt, guide_field)


def tokenize(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str) and not prompt:
        raise bad_request("the prompt is empty: give at least one character or token id", param="prompt")
    try:
        return state.engine.tokenize(prompt)
    except RequestError as exc:
        raise bad_request(str(exc), param="prompt") from None


class ResponseShape:
    """How one endpoint shapes results: a whole response, or streamed chunks. Subclasses: completions and chat."""

    id_prefix: str
    object_name: str
    chunk_object_name: str

    def __init__(self, job: Job, return_token_ids: bool):
        self.job = job
        self.return_token_ids = return_token_ids

    def content(self, text: str) -> dict:
        """A whole response's text, as the endpoint's choice carries it."""
        raise NotImplementedError

    def delta_content(self, text: str, final: bool) -> dict:
        """A streamed chunk's text, as the endpoint's choice carries it; `final`: the stream's last."""
        raise NotImplementedError

    def finish_reason(self, reason: str | None) -> str | None:
        """The choice's finish_reason, given the engine's (called after `content`, or with the last delta)."""
        return reason

    def logprobs(self, entries: list) -> dict:
        """(token id, Logprobs) entries in the endpoint's logprobs format."""
        raise NotImplementedError

    def opening_chunks(self) -> list[dict]:
        return []

    def full(self) -> dict:
        job = self.job
        logprobs = job.logprobs if job.params.logprobs is not None else None
        content = self.content("".join(job.text))
        choice = self._choice(content, self.finish_reason(job.finish_reason), logprobs, job.token_ids)
        return {**self.envelope([choice], self.object_name), "usage": job.usage}

    def delta(self, output: GenerationOutput) -> dict:
        finish_reason = output.finish_reason and output.finish_reason.value
        logprobs = [(output.token_id, output.logprobs)] if output.logprobs else None
        token_ids = [output.token_id] if output.token_id is not None else []
        content = self.delta_content(output.text, final=finish_reason is not None)
        choice = self._choice(content, self.finish_reason(finish_reason), logprobs, token_ids)
        return self.envelope([choice], self.chunk_object_name)

    def _choice(self, body: dict, finish_reason: str | None, logprobs: list | None, token_ids: list[int]) -> dict:
        choice = {"index": 0, **body, "finish_reason": finish_reason,
                  "logprobs": self.logprobs(logprobs) if logprobs is not None else None}
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice

    def envelope(self, choices: list[dict], object_name: str) -> dict:
        job = self.job
        return {"id": f"{self.id_prefix}-{job.request_id}", "object": object_name, "created": job.created,
                "model": job.model, "choices": choices}


async def run(request: web.Request, job: Job, shape: ResponseShape, stream: bool, include_usage: bool) -> web.StreamResponse:
    """Run the job; answer with one JSON body, or as server-sent events ending in `data: [DONE]`."""
    state = job.state
    state.in_flight += 1
    outputs = _outputs(job)
    status = "error"
    try:
        first = await _first(outputs)  # errors before the first token still get a proper status
        if not stream:
            async for _ in _chain(first, outputs):
                pass
            status = job.finish_reason
            return web.json_response(shape.full())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for chunk in shape.opening_chunks():
            await _send(response, chunk)
        try:
            async for output in _chain(first, outputs):
                await _send(response, shape.delta(output))
        except APIError as exc:  # failed after the first token (its replica died): the stream says why, and ends
            await _send(response, exc.body())
            await response.write(b"data: [DONE]\n\n")
            return response
        if include_usage:
            await _send(response, {**shape.envelope([], shape.chunk_object_name), "usage": job.usage})
        await response.write(b"data: [DONE]\n\n")
        status = job.finish_reason
        return response
    except (ConnectionResetError, EngineShutdown):
        status = "cancelled"
        raise
    except APIError as exc:  # refused before the first token (a bad adapter): the client's fault, or ours
        status = "rejected" if exc.status < 500 else "error"
        raise
    except BaseException as exc:  # a cancelled handler (the client went away) lands here as CancelledError
        status = "cancelled" if not isinstance(exc, Exception) else "error"
        raise
    finally:
        await outputs.aclose()  # cancels the engine request if it is still running: frees its KV and pin
        state.in_flight -= 1
        if job.tenant is not None:
            state.limits.refund(job.tenant, job.params.max_tokens - len(job.token_ids))
        _record(job, status)


async def _outputs(job: Job) -> AsyncIterator[GenerationOutput]:
    engine, tenant = job.state.engine, job.tenant
    try:
        async for output in engine.generate(job.prompt_ids, job.params, adapter=job.adapter, request_id=job.request_id,
                                            client=tenant.name if tenant else None,
                                            weight=tenant.weight if tenant else 1.0, cache_salt=job.prefix_salt):
            now = time.perf_counter()
            if job.first_token_at is None:
                job.first_token_at = now
            if output.token_id is not None:
                job.token_ids.append(output.token_id)
            job.text.append(output.text)
            if output.logprobs is not None:
                job.logprobs.append((output.token_id, output.logprobs))
            if output.prompt_logprobs is not None:
                job.prompt_logprobs = output.prompt_logprobs
            if output.cached_tokens is not None:
                job.cached_tokens = output.cached_tokens
            if output.finish_reason is not None:
                job.finish_reason = output.finish_reason.value
            yield output
    except UnknownAdapter as exc:
        raise not_found(str(exc)) from None
    except AdapterError as exc:
        raise adapter_refused(exc) from None
    except EngineShutdown as exc:
        raise APIError(503, str(exc), type="server_error", code="shutting_down") from None
    except EngineLost as exc:
        raise APIError(503, str(exc), type="server_error", code="replica_failed") from None
    except RequestError as exc:  # before the first token: the request's guide did not compile
        raise bad_request(str(exc), param=job.guide_field) from None


async def _first(outputs: AsyncIterator[GenerationOutput]) -> GenerationOutput | None:
    try:
        return await anext(outputs)
    except StopAsyncIteration:
        return None


async def _chain(first: GenerationOutput | None, rest: AsyncIterator[GenerationOutput]):
    if first is None:
        return
    yield first
    if first.finish_reason is None:
        async for output in rest:
            yield output


async def _send(response: web.StreamResponse, payload: dict) -> None:
    await response.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


def _record(job: Job, status: str | None) -> None:
    metrics, model = job.state.metrics, job.model
    metrics.requests.labels(model, status or "error").inc()
    metrics.prompt_tokens.labels(model).inc(len(job.prompt_ids))
    metrics.generation_tokens.labels(model).inc(len(job.token_ids))
    if job.tenant is not None:
        tenant = job.tenant.name
        metrics.tenant_requests.labels(tenant, status or "error").inc()
        metrics.tenant_prompt_tokens.labels(tenant).inc(len(job.prompt_ids))
        metrics.tenant_generation_tokens.labels(tenant).inc(len(job.token_ids))
    now = time.perf_counter()
    metrics.e2e.labels(model).observe(now - job.started)
    if job.first_token_at is not None:
        metrics.ttft.labels(model).observe(job.first_token_at - job.started)
        if len(job.token_ids) > 1:
            metrics.tpot.labels(model).observe((now - job.first_token_at) / (len(job.token_ids) - 1))

