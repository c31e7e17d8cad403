"""The aiohttp application: routes, authentication, and errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import hmac
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import admin_routes, openai_routes
from .errors import APIError, error_response
from .openapi import openapi_spec
from .state import STATE, TENANT, ServerState

log = logging.getLogger("loradock.server")

ADMIN_PREFIXES = ("/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
USER_PREFIXES = ("/v1/completions", "/v1/chat/completions", "/v1/models")
MAX_BODY_BYTES = 4 * 2**20


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Every error leaves in OpenAI's shape; bad input is never a 500."""
    try:
        return await handler(request)
    except APIError as exc:
        return exc.response()
    except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method, body too large
        if exc.status < 400:
            raise
        return _http_error(request, exc)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(500, "internal server error", "server_error", code="internal_error")


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors in OpenAI's shape, saying what was asked."""
    kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
    message = exc.reason if exc.text is None else exc.text
    if isinstance(exc, web.HTTPNotFound):
        message = f"no such endpoint: {request.method} {request.path} (GET /openapi.json lists them)"
    elif isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    response = error_response(exc.status, message, kind, code=exc.reason.lower().replace(" ", "_"))
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler):
    state = request.app[STATE]
    settings = state.settings
    path = request.path
    if path.startswith(ADMIN_PREFIXES):
        _check_bearer(request, settings.admin_token, "the admin API", "--admin-token or LORADOCK_ADMIN_TOKEN")
    elif path.startswith(USER_PREFIXES) and state.tenants is not None:
        tenant = state.tenants.identify(_bearer(request))
        if tenant is None:
            raise APIError(401, "this endpoint needs 'Authorization: Bearer <key>' with a tenant's API key",
                           type="authentication_error", code="invalid_token")
        request[TENANT] = tenant
    elif path.startswith(USER_PREFIXES) and settings.api_key is not None:
        _check_bearer(request, settings.api_key, "this endpoint", "--api-key")
    return await handler(request)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    return header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""


def _check_bearer(request: web.Request, expected: str | None, what: str, how: str) -> None:
    if expected is None:
        raise APIError(401, f"{what} is disabled: start the server with {how}", type="authentication_error",
                       code="admin_disabled")
    given = _bearer(request)
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise APIError(401, f"{what} needs 'Authorization: Bearer <token>'", type="authentication_error",
                       code="invalid_token")


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.shutting_down:
        return web.json_response({"status": "shutting_down"}, status=503)
    return web.json_response({"status": "ok", "model": state.settings.served_model_name,
                              "in_flight": state.in_flight})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec())


def create_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, auth_middleware], client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.add_routes(openai_routes.routes)
    app.add_routes(admin_routes.routes)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app
