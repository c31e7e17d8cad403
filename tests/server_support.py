"""A real loradock server on 127.0.0.1 inside the test process: the aiohttp app on its own event loop in a
thread, the engine thread beside it, so tests talk real HTTP and can still look at the engine's state."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loradock.serve.api.server import RunningServer as _Running
from loradock.serve.api.server import build_state, running_server
from loradock.serve.api.state import ServerSettings, ServerState
from loradock.serve.engine import Engine, EngineConfig

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
    """`loradock serve`'s server (`build_state` + `running_server`) on its own event loop in a thread. Start with
    `with ServerThread(...) as server:`; everything stops and frees on exit."""

    def __init__(self, model_path: Path, adapters_dir: Path | str | None = None, quantize: str = "none",
                 max_queue: int = 1024, api_key: str | None = None, allow_adapter_paths: bool = False,
                 tenants_file: Path | None = None,
                 build: Callable[[EngineConfig, ServerSettings], ServerState] = build_state, **engine):
        """build: how the state is made from the engine config and the settings (default: one local engine)."""
        self.config = EngineConfig(model=str(model_path), quantize=quantize, dtype="float32", device="cpu",
                                   adapters_dir=str(adapters_dir) if adapters_dir else None, **engine)
        self.settings = ServerSettings(served_model_name=MODEL_NAME, admin_token=ADMIN_TOKEN, max_queue=max_queue,
                                       api_key=api_key, allow_adapter_paths=allow_adapter_paths,
                                       tenants_file=str(tenants_file) if tenants_file else None)
        self._build = build
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> RunningServer:
        self.state = self._build(self.config, self.settings)
        self._thread.start()
        started: concurrent.futures.Future[_Running] = concurrent.futures.Future()
        self._serving = asyncio.run_coroutine_threadsafe(self._serve(started), self._loop)
        server = started.result(60)
        return RunningServer(server.url, self.state.engine, self.state, {"Authorization": f"Bearer {ADMIN_TOKEN}"})

    async def _serve(self, started: concurrent.futures.Future) -> None:
        self._stop = asyncio.Event()
        async with running_server(self.state) as server:
            started.set_result(server)
            await self._stop.wait()

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._serving.result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
