"""A small client for OpenAI-compatible servers (loradock, vLLM): greedy answers, and how a model scores a text.

Scoring a fixed text is OpenAI's legacy way, which vLLM also serves: ``/v1/completions`` with ``"echo": true,
"logprobs": K, "max_tokens": 1``. The answer's ``choices[0].logprobs`` lists the echoed prompt's tokens and then the
one generated token: ``tokens``, ``token_logprobs`` (None for the first prompt token) and ``top_logprobs`` (None
first, then {token text: logprob} of the K likeliest tokens at each position).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

T = TypeVar("T")
Prompt = str | list[dict]  # a plain prompt (/v1/completions) or chat messages (/v1/chat/completions)


class ServerError(RuntimeError):
    """The server could not be reached or refused a request."""


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int | None  # the prompt's length in tokens, as the server counted it (usage)


@dataclass(frozen=True)
class TokenScores:
    """A text as a model reads it: each token, log p(token | the tokens before) (None for the first), and the top-K
    {token text: logprob} at that position (None for the first)."""

    tokens: list[str]
    logprobs: list[float | None]
    top: list[dict[str, float] | None]


class OpenAIClient:
    """Requests to one server; at most `concurrency` at a time (the rest wait for a connection)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, api_key: str | None = None):
        self.session, self.url = session, url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def answer(self, model: str, prompt: Prompt, max_tokens: int) -> Answer:
        """The model's greedy answer (temperature 0) to a plain prompt or to chat messages."""
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
        if isinstance(prompt, str):
            reply = await self._post("/v1/completions", {**body, "prompt": prompt})
            text = reply["choices"][0]["text"]
        else:
            reply = await self._post("/v1/chat/completions", {**body, "messages": prompt})
            text = reply["choices"][0]["message"]["content"] or ""
        return Answer(text, (reply.get("usage") or {}).get("prompt_tokens"))

    async def score(self, model: str, text: str, top_k: int) -> TokenScores:
        """How `model` scores `text` token by token (echo with logprobs), the generated token left out."""
        body = {"model": model, "prompt": text, "echo": True, "logprobs": top_k, "max_tokens": 1, "temperature": 0}
        reply = await self._post("/v1/completions", body, what="scoring a text (echo with logprobs)")
        logprobs = reply["choices"][0]["logprobs"]
        length = (reply.get("usage") or {}).get("prompt_tokens") or len(logprobs["tokens"]) - 1
        return TokenScores(logprobs["tokens"][:length], logprobs["token_logprobs"][:length],
                           logprobs["top_logprobs"][:length])

    async def _post(self, path: str, body: dict, what: str | None = None) -> dict:
        try:
            async with self.session.post(self.url + path, json=body, headers=self.headers) as response:
                if response.status == 200:
                    return await response.json()
                detail = await response.text()
        except (aiohttp.ClientError, OSError) as exc:
            raise ServerError(f"cannot reach {self.url}: {exc}") from None
        with contextlib.suppress(ValueError, KeyError, TypeError):  # an OpenAI-shaped error: its message
            detail = json.loads(detail)["error"]["message"]
        doing = f" ({what})" if what else ""
        raise ServerError(f"{self.url}{path} for model {body['model']!r}{doing} answered {response.status}: {detail}")


async def gather(requests: list[Awaitable[T]], bar=None) -> list[T]:
    """Await every request at once (the client's pool bounds how many run); `bar` (tqdm) counts them."""
    if bar is not None:
        bar.total += len(requests)
        bar.refresh()

    async def counted(request: Awaitable[T]) -> T:
        result = await request
        if bar is not None:
            bar.update(1)
        return result

    return await asyncio.gather(*(counted(request) for request in requests))


@contextlib.asynccontextmanager
async def open_client(url: str, api_key: str | None = None, concurrency: int = 8) -> AsyncIterator[OpenAIClient]:
    """A client whose connection pool holds `concurrency` connections: more requests at once wait their turn."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield OpenAIClient(session, url, api_key)
