"""Errors in OpenAI's shape, `{"error": {"message", "type", "code"}}`, with the right HTTP status."""

from __future__ import annotations

import json

from aiohttp import web
from pydantic import ValidationError


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.type, self.code, self.param)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def error_response(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type, "code": code, "param": param}}
    return web.json_response(body, status=status)


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def not_found(message: str, code: str = "model_not_found") -> APIError:
    return APIError(404, message, type="not_found_error", code=code)


def from_validation_error(error: ValidationError) -> APIError:
    """pydantic's errors, one line each, naming the field."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg']}")
    first = error.errors()[0]["loc"] if error.errors() else ()
    return bad_request("; ".join(parts), param=str(first[0]) if first else None)


async def parse_body(request: web.Request, model_class):
    """The request body as JSON, validated into `model_class`; a 400 naming the fields otherwise."""
    payload = await read_json(request)
    try:
        return model_class.model_validate(payload)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def read_json(request: web.Request) -> object:
    """The request body as JSON, or a 400 saying why not."""
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the body is JSON nested too deep to read", code="invalid_json") from None
