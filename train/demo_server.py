"""The demo's server: `loradock serve`'s server in this process, queried over real HTTP on 127.0.0.1 (with
train/openai_client.py, like any OpenAI-compatible server)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from ..serve.api.server import build_state
from ..serve.api.server import running_server as running_api_server
from ..serve.api.state import ServerSettings
from ..serve.engine import EngineConfig

BASE_NAME = "base"


@contextlib.asynccontextmanager
async def running_server(model: Path, adapters_dir: Path, max_model_len: int = 128) -> AsyncIterator[str]:
    """Serve `model` with every adapter folder in `adapters_dir`, as `loradock serve --model MODEL --adapters DIR
    --max-model-len N` would (the demo's requests are short), on a free port of 127.0.0.1; yield the base URL."""
    config = EngineConfig(model=str(model), adapters_dir=str(adapters_dir), max_model_len=max_model_len)
    state = await asyncio.to_thread(build_state, config, ServerSettings(served_model_name=BASE_NAME))
    async with running_api_server(state) as server:
        yield server.url
