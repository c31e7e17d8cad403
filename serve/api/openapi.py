"""The OpenAPI 3.1 description of every endpoint, built from the same pydantic models that validate requests."""

from __future__ import annotations

import functools

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ... import __version__
from ...adapters.manager import AdapterSummary
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    LoadAdapterRequest,
    VllmLoadLoraRequest,
    VllmUnloadLoraRequest,
)

_MODELS: tuple[type, ...] = (  # pydantic models, and the adapters layer's AdapterSummary (a pydantic dataclass)
    CompletionRequest, ChatCompletionRequest, LoadAdapterRequest, VllmLoadLoraRequest, VllmUnloadLoraRequest,
    ErrorResponse, AdapterSummary,
)
_ERRORS = {
    code: {"description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for code, text in {
        "400": "bad request or parameters", "401": "missing or wrong bearer token",
        "403": "adapter path outside the adapter directory", "404": "unknown model or adapter",
        "409": "adapter name already registered", "413": "request body over the size limit, or prompt beyond the context",
        "429": "queue full, or the tenant over a limit (then with Retry-After, seconds)", "503": "shutting down",
    }.items()
}


# One server-sent event (OpenAPI 3.1 has a text/event-stream schema describe each event): its data is a JSON
# chunk, or "[DONE]" at the end.
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}


def _body(model: type[BaseModel]) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}


def _ok(description: str, schema: dict | None = None, media: str = "application/json") -> dict:
    content = {media: {"schema": schema or {"type": "object"}}}
    return {"description": description, "content": content}


def _operation(summary: str, ok: dict, body: type[BaseModel] | None = None, security: str | None = None,
               errors=("400", "401")) -> dict:
    op = {"summary": summary, "responses": {"200": ok, **{c: _ERRORS[c] for c in errors}}}
    if body is not None:
        op["requestBody"] = _body(body)
    if security:
        op["security"] = [{security: []}]
    return op


@functools.cache
def openapi_spec() -> dict:
    _, defs = models_json_schema([(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}")
    generation_errors = ("400", "401", "404", "413", "429", "503")
    load_errors = ("400", "401", "403", "409", "413")  # every POST may also meet the body size limit (413)
    stream_or_json = {"description": "a JSON body, or server-sent events ending in `data: [DONE]` when stream",
                      "content": {"application/json": {"schema": {"type": "object"}},
                                  "text/event-stream": {"schema": _SSE_EVENT}}}
    adapter = {"$ref": "#/components/schemas/AdapterSummary"}
    name_param = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths = {
        "/v1/completions": {"post": _operation("Text completion (OpenAI-compatible)", stream_or_json, CompletionRequest,
                                               "apiKey", generation_errors)},
        "/v1/chat/completions": {"post": _operation("Chat completion (OpenAI-compatible)", stream_or_json,
                                                    ChatCompletionRequest, "apiKey", generation_errors)},
        "/v1/models": {"get": _operation("The base model and every adapter (with tenants: those the key may use)",
                                         _ok("model list"), security="apiKey",
                                         errors=("401",))},
        "/v1/adapters": {
            "get": _operation("Adapters and their tiers", _ok("adapter list"), security="adminToken",
                              errors=("400", "401")),
            "post": {**_operation("Load an adapter, or mix loaded ones (merge): validate, then warm into host and device",
                                  _ok("the loaded adapter", adapter), LoadAdapterRequest, "adminToken", load_errors),
                     "responses": {"201": _ok("the loaded adapter", adapter), **{c: _ERRORS[c] for c in load_errors}}},
        },
        "/v1/adapters/{name}": {"delete": {**_operation("Unload an adapter", _ok("unloaded"), security="adminToken",
                                                         errors=("400", "401", "404")), "parameters": name_param}},
        "/v1/adapters/{name}/reload": {"post": {**_operation("Reload an adapter from disk (a mix: mixed again)",
                                                             _ok("the new version", adapter),
                                                             security="adminToken",
                                                             errors=("400", "401", "403", "404", "413")),
                                                "parameters": name_param}},
        "/v1/load_lora_adapter": {"post": _operation("vLLM-compatible load", _ok("done", {"type": "string"}, "text/plain"),
                                                     VllmLoadLoraRequest, "adminToken", load_errors)},
        "/v1/unload_lora_adapter": {"post": _operation("vLLM-compatible unload", _ok("done", {"type": "string"}, "text/plain"),
                                                       VllmUnloadLoraRequest, "adminToken", ("400", "401", "404", "413"))},
        "/health": {"get": {"summary": "Liveness", "responses": {"200": _ok("serving"), "503": _ok("shutting down")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": _ok("text exposition format", {"type": "string"}, "text/plain")}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _ok("OpenAPI 3.1")}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "loradock", "version": __version__,
                 "description": "Multi-LoRA inference server with an OpenAI-compatible API"},
        "paths": paths,
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"},
                                "adminToken": {"type": "http", "scheme": "bearer"}},
        },
    }
