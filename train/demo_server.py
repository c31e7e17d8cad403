"""The demo's server: `loradock serve`'s server in this process, queried over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ..serve.api.server import build_state
from ..serve.api.server import running_server as running_api_server
from ..serve.api.state import ServerSettings
from ..serve.engine import EngineConfig

BASE_NAME = "demo-base"


@dataclass(frozen=True)
class Query:
    """One request: a plain prompt (/v1/completions) or one user message (/v1/chat/completions)."""

    model: str  # BASE_NAME or an adapter's name
    text: str
    chat: bool


@contextlib.asynccontextmanager
async def running_server(model: Path, adapters_dir: Path, max_model_len: int = 128) -> AsyncIterator[str]:
    """Serve `model` with every adapter folder in `adapters_dir`, as `loradock serve --model MODEL --adapters DIR
    --max-model-len N` would (the demo's requests are short), on a free port of 127.0.0.1; yield the base URL."""
    config = EngineConfig(model=str(model), adapters_dir=str(adapters_dir), max_model_len=max_model_len)
    state = await asyncio.to_thread(build_state, config, ServerSettings(served_model_name=BASE_NAME))
    async with running_api_server(state) as server:
        yield server.url


async def ask_all(url: str, queries: list[Query], max_tokens: int) -> list[str]:
    """Send every query at once (the server batches them together) and return each answer's text, greedy."""
    async with aiohttp.ClientSession(base_url=url) as session:
        return await asyncio.gather(*(_ask(session, query, max_tokens) for query in queries))


async def _ask(session: aiohttp.ClientSession, query: Query, max_tokens: int) -> str:
    body = {"model": query.model, "max_tokens": max_tokens, "temperature": 0}
    if query.chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": query.text}]
    else:
        path, body["prompt"] = "/v1/completions", query.text
    async with session.post(path, json=body) as response:
        answer = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{path} for {query.model} answered {response.status}: {answer}")
    choice = answer["choices"][0]
    return choice["message"]["content"] if query.chat else choice["text"]
