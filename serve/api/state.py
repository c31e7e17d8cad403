"""What every handler shares: the engine, the settings, the metrics, and the server's own bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ..engine import Engine
from ..metrics import ServerMetrics


@dataclass
class ServerSettings:
    served_model_name: str
    adapters_dir: Path | None = None
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
    # Names unloaded through the admin API: not brought back by "load on first use" until loaded again.
    unloaded: set[str] = field(default_factory=set)


STATE = web.AppKey("loradock_state", ServerState)
