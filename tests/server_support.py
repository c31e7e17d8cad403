"""A real loradock server on 127.0.0.1 inside the test process: the aiohttp app on its own event loop in a
thread, the engine thread beside it, so tests talk real HTTP and can still look at the engine's state."""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from aiohttp import web

from loradock.serve.api.app import create_app
from loradock.serve.api.state import ServerSettings, ServerState
from loradock.serve.engine import Engine, EngineConfig
from loradock.serve.metrics import ServerMetrics
from loradock.serve.model_loader import load_model

ADMIN_TOKEN = "test-admin-token"
MODEL_NAME = "tiny-base"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    engine: Engine
    state: ServerState
    admin_headers: dict


class ServerThread:
    """Start with `with ServerThread(...) as server:`; everything stops and frees on exit."""

    def __init__(self, model_path: Path, adapters_dir: Path | None = None, quantize: str = "none",
                 max_queue: int = 1024, api_key: str | None = None, allow_adapter_paths: bool = False, **engine):
        self.model_path, self.adapters_dir, self.quantize = model_path, adapters_dir, quantize
        self.settings = dict(max_queue=max_queue, api_key=api_key, allow_adapter_paths=allow_adapter_paths)
        self.engine_config = engine
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> RunningServer:
        metrics = ServerMetrics()
        model, tokenizer = load_model(self.model_path, self.quantize, torch.float32, torch.device("cpu"))
        config = EngineConfig(adapters_dir=str(self.adapters_dir) if self.adapters_dir else None, **self.engine_config)
        self.engine = Engine(model, tokenizer, config, torch.device("cpu"), metrics).start()
        metrics.watch(self.engine)
        settings = ServerSettings(served_model_name=MODEL_NAME, adapters_dir=self.adapters_dir,
                                  admin_token=ADMIN_TOKEN, **self.settings)
        self.state = ServerState(self.engine, settings, metrics)
        port = free_port()
        self._thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(port), self._loop).result(30)
        return RunningServer(f"http://127.0.0.1:{port}", self.engine, self.state,
                             {"Authorization": f"Bearer {ADMIN_TOKEN}"})

    async def _start(self, port: int) -> web.AppRunner:
        runner = web.AppRunner(create_app(self.state), handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self.engine.shutdown()
