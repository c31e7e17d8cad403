"""The OpenAI-compatible user endpoints: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import time

from aiohttp import web

from ...adapters.manager import is_valid_name
from ..engine import GenerationOutput
from .errors import APIError, bad_request, parse_body
from .generation import ResponseShape, adapter_path, admit, resolve_model, run, sampling_params, tokenize
from .schemas import ChatCompletionRequest, CompletionRequest
from .state import STATE

routes = web.RouteTableDef()


class CompletionShape(ResponseShape):
    id_prefix = "cmpl"
    chunk_object_name = "text_completion"

    def full(self) -> dict:
        job = self.job
        choice = {"index": 0, "text": "".join(job.text), "finish_reason": job.finish_reason,
                  "logprobs": self._logprobs(job.logprobs) if job.params.logprobs is not None else None}
        if self.return_token_ids:
            choice["token_ids"] = job.token_ids
        return {**self.envelope([choice], "text_completion"), "usage": job.usage}

    def delta(self, output: GenerationOutput) -> dict:
        choice = {"index": 0, "text": output.text, "finish_reason": output.finish_reason and output.finish_reason.value,
                  "logprobs": self._logprobs([(output.token_id, output.logprobs)]) if output.logprobs else None}
        if self.return_token_ids:
            choice["token_ids"] = [output.token_id] if output.token_id is not None else []
        return self.envelope([choice], "text_completion")

    def _logprobs(self, entries) -> dict:
        decode = self.job.state.engine.tokenizer.decode
        tokens = [decode([t]) for t, _ in entries]
        offsets, offset = [], 0
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for _, lp in entries],
            "top_logprobs": [{decode([t]): v for t, v in lp.top} for _, lp in entries],
            "text_offset": offsets,
        }


class ChatShape(ResponseShape):
    id_prefix = "chatcmpl"
    chunk_object_name = "chat.completion.chunk"

    def full(self) -> dict:
        job = self.job
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(job.text)},
                  "finish_reason": job.finish_reason, "logprobs": self._logprobs(job.logprobs) if job.params.logprobs is not None else None}
        if self.return_token_ids:
            choice["token_ids"] = job.token_ids
        return {**self.envelope([choice], "chat.completion"), "usage": job.usage}

    def opening_chunks(self) -> list[dict]:
        return [self.envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                              self.chunk_object_name)]

    def delta(self, output: GenerationOutput) -> dict:
        choice = {"index": 0, "delta": {"content": output.text},
                  "finish_reason": output.finish_reason and output.finish_reason.value,
                  "logprobs": self._logprobs([(output.token_id, output.logprobs)]) if output.logprobs else None}
        if self.return_token_ids:
            choice["token_ids"] = [output.token_id] if output.token_id is not None else []
        return self.envelope([choice], self.chunk_object_name)

    def _logprobs(self, entries) -> dict:
        decode = self.job.state.engine.tokenizer.decode

        def item(token_id, logprob):
            text = decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**item(t, lp.logprob), "top_logprobs": [item(i, v) for i, v in lp.top]} for t, lp in entries]}


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await parse_body(request, CompletionRequest)
    adapter = resolve_model(state, body.model)
    prompt_ids = tokenize(state, body.prompt)
    params = sampling_params(state, body, len(prompt_ids), body.max_tokens, body.logprobs)
    job = admit(state, body.model, adapter, prompt_ids, params)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await run(request, job, CompletionShape(job, body.return_token_ids), body.stream, include_usage)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await parse_body(request, ChatCompletionRequest)
    adapter = resolve_model(state, body.model)
    prompt_ids = chat_prompt(state, body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(state, body, len(prompt_ids), max_tokens, top)
    job = admit(state, body.model, adapter, prompt_ids, params)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await run(request, job, ChatShape(job, body.return_token_ids), body.stream, include_usage)


def chat_prompt(state, body: ChatCompletionRequest) -> list[int]:
    """The conversation rendered by the tokenizer's chat template, with the assistant's turn opened."""
    tokenizer = state.engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model's tokenizer has no chat template: use /v1/completions with a plain prompt",
                          code="no_chat_template")
    messages = [m.model_dump() for m in body.messages]
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # the template itself rejects the conversation (jinja raise_exception)
        raise bad_request(f"the chat template refused the messages: {exc}", code="invalid_messages") from None
    ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    return tokenize(state, list(ids))


@routes.get("/v1/models")
async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    now = int(time.time())
    base = state.settings.served_model_name
    data = [{"id": base, "object": "model", "created": now, "owned_by": "loradock", "root": base, "parent": None}]
    for name in sorted(known_adapter_names(state)):
        data.append({"id": name, "object": "model", "created": now, "owned_by": "loradock", "root": name, "parent": base})
    return web.json_response({"object": "list", "data": data})


def known_adapter_names(state) -> set[str]:
    """Registered adapters plus folders in the adapter directory not yet loaded (and not unloaded)."""
    names = {v.name for v in state.engine.adapters.registered()} if state.engine.adapters else set()
    directory = state.settings.adapters_dir
    if directory is not None and directory.is_dir():
        for path in directory.iterdir():
            if not is_valid_name(path.name) or path.name in state.unloaded or path.name in names:
                continue
            try:
                folder = adapter_path(directory, path.name)
            except APIError:  # a symlink leading out of the directory, or a loop
                continue
            if (folder / "adapter_config.json").is_file():
                names.add(path.name)
    return names
