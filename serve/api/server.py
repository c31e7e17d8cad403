"""The one way to build and run a loradock server: `loradock serve`, the demo, the trainer's gate and the tests.

    state = build_state(EngineConfig(...), ServerSettings(...))   # loads the model (blocking)
    async with running_server(state, host, port) as server:       # engine thread + HTTP site on host:port
        ... server.url ...                                        # on exit: site, then engine, stopped
    await serve_until_signal(state, host, port)                   # `loradock serve`: until SIGTERM/SIGINT, draining
                                                                  #   (SIGHUP: reload the tenants file)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from ..engine import Engine, EngineConfig
from ..metrics import ServerMetrics
from .app import create_app
from .state import ServerSettings, ServerState
from .tenants import Tenants, TenantsError

log = logging.getLogger("loradock.server")


def build_state(config: EngineConfig, settings: ServerSettings) -> ServerState:
    """Read the tenants file (if any; TenantsError before anything loads), load the model into an engine (not
    started yet) and wire its metrics: everything a server serves from."""
    tenants = Tenants.load(settings.tenants_file) if settings.tenants_file is not None else None
    engine = Engine.from_config(config)
    state = ServerState(engine, settings, ServerMetrics(engine), tenants=tenants)
    state.limits.configure(tenants)
    return state


def reload_tenants(state: ServerState) -> bool:
    """Read the tenants file again: new requests see the new keys, scopes, weights and limits; requests in flight
    finish as they started. A file that cannot be used leaves the previous tenants in place."""
    if state.settings.tenants_file is None:
        return False
    try:
        tenants = Tenants.load(state.settings.tenants_file)
    except TenantsError as exc:
        log.error("tenants not reloaded, the previous ones stay: %s", exc)
        return False
    state.tenants = tenants
    state.limits.configure(tenants)
    log.info("tenants reloaded from %s: %s", state.settings.tenants_file, ", ".join(sorted(tenants.by_name)))
    return True


@dataclass
class RunningServer:
    url: str  # http://host:port
    state: ServerState
    _site: web.TCPSite

    async def drain(self) -> None:
        """Refuse new requests and connections; let in-flight ones finish within the settings' drain timeout."""
        state = self.state
        state.shutting_down = True
        log.info("shutting down: draining %d requests (at most %.0f s)", state.in_flight, state.settings.drain_timeout)
        await self._site.stop()
        deadline = asyncio.get_running_loop().time() + state.settings.drain_timeout
        while state.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_server(state: ServerState, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[RunningServer]:
    """Start the engine thread and serve the app on host:port (0: any free port); stop both on exit."""
    state.engine.start()
    runner = web.AppRunner(create_app(state), handler_cancellation=True, access_log=None)
    try:
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield RunningServer(f"http://{bound_host}:{bound_port}", state, site)
    finally:
        await runner.cleanup()
        await asyncio.to_thread(state.engine.shutdown)


async def serve_until_signal(state: ServerState, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT; then refuse new requests, let in-flight ones finish (bounded), stop.
    SIGHUP reloads the tenants file."""
    async with running_server(state, host, port) as server:
        name = state.settings.served_model_name
        log.info("loradock serving %s on %s", name, server.url)
        print(f"loradock: serving {name!r} on {server.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def hang_up() -> None:
            if reload_tenants(state):
                print(f"loradock: tenants reloaded from {state.settings.tenants_file}", flush=True)

        loop.add_signal_handler(signal.SIGHUP, hang_up)
        await stop.wait()
        await server.drain()
