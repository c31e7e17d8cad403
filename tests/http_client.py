"""A small blocking HTTP client for the server tests (stdlib only): any body, any method, raw bytes included,
and a streaming request that can be held open and then dropped."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def error(self) -> dict:
        """The OpenAI-shaped error of this reply; asserts the shape on the way."""
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        body = self.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert {"message", "type", "code"} <= set(error), error
        assert isinstance(error["message"], str) and error["message"], error
        assert isinstance(error["type"], str) and error["type"], error
        assert isinstance(error["code"], str) and error["code"], error
        return error


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def call(url: str, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60) -> Reply:
    """One request. `body`: bytes as they are, anything else as JSON, None for no body."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    connection = _connection(url, timeout)
    try:
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


class OpenStream:
    """A streaming request held open: read some events, then `close()` drops the connection mid-stream."""

    def __init__(self, url: str, path: str, body: dict, headers: dict | None = None, timeout: float = 60):
        self.connection = _connection(url, timeout)
        self.connection.request("POST", path, body=json.dumps({**body, "stream": True}).encode(),
                                headers={"Content-Type": "application/json", **(headers or {})})
        self.response = self.connection.getresponse()
        self.status = self.response.status

    def next_event(self) -> dict | str:
        """The next server-sent event's data: a dict, or the string '[DONE]'."""
        while True:
            line = self.response.readline()
            assert line, "the stream ended"
            line = line.strip()
            if line.startswith(b"data: "):
                data = line[len(b"data: "):]
                return data.decode() if data == b"[DONE]" else json.loads(data)

    def close(self) -> None:
        self.response.close()
        self.connection.close()

    def __enter__(self) -> OpenStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
