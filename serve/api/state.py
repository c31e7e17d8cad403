"""What every handler shares: the engine, the settings, the metrics, and the server's own bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from ..engine import Engine
from ..metrics import ServerMetrics


@dataclass
class ServerSettings:
    served_model_name: str
    allow_adapter_paths: bool = False
    max_queue: int = 1024
    api_key: str | None = None
    admin_token: str | None = None
    drain_timeout: float = 30.0


@dataclass
class ServerState:
    engine: Engine
    settings: ServerSettings
    metrics: ServerMetrics
    in_flight: int = 0  # requests accepted and not yet finished
    shutting_down: bool = False


STATE = web.AppKey("loradock_state", ServerState)
