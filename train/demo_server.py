"""The demo's server: `loradock serve`'s app and engine in this process, queried over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import torch
from aiohttp import web

from ..serve.api.app import create_app
from ..serve.api.state import ServerSettings, ServerState
from ..serve.engine import Engine
from ..serve.metrics import ServerMetrics

BASE_NAME = "demo-base"


@dataclass(frozen=True)
class Query:
    """One request: a plain prompt (/v1/completions) or one user message (/v1/chat/completions)."""

    model: str  # BASE_NAME or an adapter's name
    text: str
    chat: bool


@contextlib.asynccontextmanager
async def running_server(model: Path, adapters_dir: Path) -> AsyncIterator[str]:
    """Serve `model` with every adapter folder in `adapters_dir`, with the settings of `loradock serve --model MODEL
    --adapters DIR --max-model-len 128` (the demo's requests are short); yield the base URL."""
    from ..serve.cli import build_parser, engine_config

    threads = torch.get_num_threads()  # engine_config sets the serving share of the cores, process-wide
    args = build_parser().parse_args(["serve", "--model", str(model), "--adapters", str(adapters_dir),
                                      "--max-model-len", "128"])
    metrics = ServerMetrics()
    engine = await asyncio.to_thread(Engine.from_config, engine_config(args), metrics)
    engine.start()
    metrics.watch(engine)
    state = ServerState(engine, ServerSettings(served_model_name=BASE_NAME, adapters_dir=adapters_dir), metrics)
    runner = web.AppRunner(create_app(state), access_log=None)
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        engine.shutdown()
        torch.set_num_threads(threads)


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
