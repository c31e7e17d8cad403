"""What every handler shares: the engine, the settings, the metrics, and the server's own bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from ..metrics import ServerMetrics
from .backend import EngineBackend
from .rate_limits import RateLimits
from .tenants import Tenant, Tenants


@dataclass
class ServerSettings:
    served_model_name: str
    allow_adapter_paths: bool = False
    max_queue: int = 1024
    api_key: str | None = None
    admin_token: str | None = None
    drain_timeout: float = 30.0
    tenants_file: str | None = None  # API keys scoped to tenants (then api_key is not used); reloaded on SIGHUP
    tool_call_parser: str = "hermes"  # how the model writes tool calls (serve/api/tool_parsers.py TOOL_CALL_FORMATS)


@dataclass
class ServerState:
    engine: EngineBackend  # the local Engine, or the client of engine replicas
    settings: ServerSettings
    metrics: ServerMetrics
    in_flight: int = 0  # requests accepted and not yet finished
    shutting_down: bool = False
    tenants: Tenants | None = None  # read from settings.tenants_file; replaced whole on reload
    limits: RateLimits = field(default_factory=RateLimits)


STATE = web.AppKey("loradock_state", ServerState)
TENANT = web.RequestKey("loradock_tenant", Tenant)  # who calls a user endpoint, with --tenants
