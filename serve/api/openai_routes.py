"""The OpenAI-compatible user endpoints: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import time
import uuid

from aiohttp import web

from ..engine import GenerationOutput
from .chat_prompt import chat_prompt
from .errors import bad_request, parse_body
from .generation import Job, ResponseShape, admit, resolve_model, run, sampling_params, tokenize
from .mixing import request_mix
from .schemas import ChatCompletionRequest, CompletionRequest
from .state import STATE, TENANT, ServerState
from .structured import output_guide
from .tenants import Tenant
from .tool_answers import Answer, StreamedAnswer, read_answer
from .tool_calls import ToolUse, tool_use
from .tool_grammar import forced_calls_guide
from .tool_parsers import TOOL_CALL_FORMATS, ParsedCall

routes = web.RouteTableDef()


class CompletionShape(ResponseShape):
    """Legacy completions; with `echo`, the prompt leads the text and the log-probabilities (its first token's are
    null: nothing precedes it), in the whole response or in the first chunk."""

    id_prefix = "cmpl"
    object_name = chunk_object_name = "text_completion"

    def __init__(self, job: Job, return_token_ids: bool, echo: bool):
        super().__init__(job, return_token_ids)
        self.echo = echo
        self._echoed = False  # the stream's first chunk carries the prompt

    def content(self, text: str) -> dict:
        if self.echo:
            text = self._prompt_text() + text
        return {"text": text}

    def delta_content(self, text: str, final: bool) -> dict:
        return {"text": self._prompt_text() + text if self.echo and not self._echoed else text}

    def full(self) -> dict:
        if self.echo and self.job.params.logprobs is not None:
            self.job.logprobs[:0] = self._prompt_entries()
        return super().full()

    def delta(self, output: GenerationOutput) -> dict:
        chunk = super().delta(output)
        if self.echo and not self._echoed:
            self._echoed = True
            if self.job.params.logprobs is not None:
                entries = self._prompt_entries() + ([(output.token_id, output.logprobs)] if output.logprobs else [])
                chunk["choices"][0]["logprobs"] = self.logprobs(entries)
        return chunk

    def _prompt_text(self) -> str:
        return self.job.state.engine.tokenizer.decode(self.job.prompt_ids)

    def _prompt_entries(self) -> list:
        job = self.job
        return list(zip(job.prompt_ids, (None, *job.prompt_logprobs)))

    def logprobs(self, entries: list) -> dict:
        decode = self.job.state.engine.tokenizer.decode
        tokens = [decode([t]) for t, _ in entries]
        offsets, offset = [], 0
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob if lp is not None else None for _, lp in entries],
            "top_logprobs": [{decode([t]): v for t, v in lp.top} if lp is not None else None for _, lp in entries],
            "text_offset": offsets,
        }


class ChatShape(ResponseShape):
    """Chat messages; when the request offers tools, calls read out of the answer become `tool_calls` (streamed as
    one delta per call, name and whole arguments at once) and the finish reason "tool_calls"."""

    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, job: Job, return_token_ids: bool, tools: ToolUse):
        super().__init__(job, return_token_ids)
        self.tools = tools if tools.names else None  # None: the answer is not read for calls
        self.stream = StreamedAnswer(tools) if self.tools else None
        self.called = False

    def content(self, text: str) -> dict:
        answer = read_answer(text, self.tools) if self.tools else Answer(text)
        message = {"role": "assistant", "content": answer.content, "refusal": None}
        if answer.calls:
            message["tool_calls"] = [self._tool_call(call) for call in answer.calls]
        return {"message": message}

    def delta_content(self, text: str, final: bool) -> dict:
        if self.stream is None:
            return {"delta": {"content": text}}
        sent = self.stream.calls_sent
        answer = self.stream.feed(text, final)
        delta: dict = {"content": answer.content}
        if answer.calls:
            delta["tool_calls"] = [{"index": sent + i, **self._tool_call(call)} for i, call in enumerate(answer.calls)]
        return {"delta": delta}

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason is not None and self.called else reason

    def _tool_call(self, call: ParsedCall) -> dict:
        self.called = True
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}

    def opening_chunks(self) -> list[dict]:
        return [self.envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                              self.chunk_object_name)]

    def logprobs(self, entries: list) -> dict:
        decode = self.job.state.engine.tokenizer.decode

        def item(token_id, logprob):
            text = decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**item(t, lp.logprob), "top_logprobs": [item(i, v) for i, v in lp.top]} for t, lp in entries]}


async def _adapter(state: ServerState, body: CompletionRequest | ChatCompletionRequest, tenant: Tenant | None) -> str | None:
    """The adapter the request runs on: its mix (`adapters`), else the model it names (None: the base)."""
    if body.adapters is not None:
        return await request_mix(state, body, tenant)
    return resolve_model(state, body.model, tenant)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await parse_body(request, CompletionRequest)
    tenant = request.get(TENANT)
    adapter = await _adapter(state, body, tenant)
    prompt_ids = tokenize(state, body.prompt)
    guide, guide_field = output_guide(body)
    params = sampling_params(state, body, len(prompt_ids), body.max_tokens, body.logprobs,
                             body.logprobs if body.echo else None, guide=guide)
    job = admit(state, body.model, adapter, prompt_ids, params, tenant, body.cache_salt, guide_field)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await run(request, job, CompletionShape(job, body.return_token_ids, body.echo), body.stream, include_usage)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await parse_body(request, ChatCompletionRequest)
    tenant = request.get(TENANT)
    adapter = await _adapter(state, body, tenant)
    tools = tool_use(body, TOOL_CALL_FORMATS[state.settings.tool_call_parser])
    guide, guide_field = output_guide(body)
    if tools.forced:
        if guide is not None:
            raise bad_request(f"tool_choice forces a tool call, which {guide_field} cannot constrain as well: give "
                              "one of them", param=guide_field)
        guide, guide_field = await forced_calls_guide(tools), "tools"
    prompt_ids = chat_prompt(state, body, tools)
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(state, body, len(prompt_ids), max_tokens, top, guide=guide)
    job = admit(state, body.model, adapter, prompt_ids, params, tenant, body.cache_salt, guide_field)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await run(request, job, ChatShape(job, body.return_token_ids, tools), body.stream, include_usage)


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    """The base model and the adapters; with --tenants, those the caller's key may use."""
    state = request.app[STATE]
    tenant = request.get(TENANT)
    now = int(time.time())
    base = state.settings.served_model_name
    data = []
    if tenant is None or tenant.may_use(None):
        data.append({"id": base, "object": "model", "created": now, "owned_by": "loradock", "root": base,
                     "parent": None})
    adapters = state.engine.adapters
    for name in sorted(adapters.names() if adapters is not None else ()):
        if tenant is None or tenant.may_use(name):
            data.append({"id": name, "object": "model", "created": now, "owned_by": "loradock", "root": name,
                         "parent": base})
    return web.json_response({"object": "list", "data": data})
