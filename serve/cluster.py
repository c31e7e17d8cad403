"""`loradock serve --replicas N`: N engine replicas as a Ray Serve deployment behind loradock's own HTTP server.

    clients ──HTTP──► serve/api (the same app, routes, auth and errors as one server)   the driver process
                         │ ReplicaClient: the engine interface over a DeploymentHandle
                         ▼
                 Ray Serve deployment "engine": N × EngineReplica (one Engine each)      Ray worker processes

Serve's own HTTP proxy is not started: the ingress is loradock's aiohttp app. Without `--ray-address` a local Ray
instance is started and stopped on exit; with it, the deployment joins that cluster and is deleted on exit.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..adapters.directory import check_name
from ..adapters.manager import as_source
from ..adapters.registry import AdapterRegistry
from ..adapters.registry_file import RegistryFile
from ..adapters.store import open_adapters
from .api.server import serve_until_signal
from .api.state import ServerSettings, ServerState
from .engine import EngineConfig
from .metrics import ServerMetrics
from .models.loader import load_tokenizer
from .models.source import resolve_model_path
from .replica import replica_class
from .replica_client import ClusterAdapter, ReplicaClient, RoutingCollector

log = logging.getLogger("loradock.cluster")

APP_NAME = "loradock"


@dataclass(frozen=True)
class ClusterSettings:
    replicas: int
    ray_address: str | None = None  # None: start a local Ray instance (and stop it on exit)
    replica_cpus: float = 1.0  # Ray CPUs each replica reserves (fractions share a core)
    replica_gpus: float = 0.0
    threads: int = 1  # torch compute threads in each replica
    max_ongoing_requests: int | None = None  # per replica before the router looks elsewhere; default max_num_seqs


def connect(address: str | None) -> bool:
    """Join the Ray cluster at `address`, or start a local one; True if it was started here."""
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    return address is None


def deploy(config: EngineConfig, cluster: ClusterSettings) -> DeploymentHandle:
    """Start the replicas (each loads the model) and return a handle to them once all are ready."""
    serve.start(proxy_location="Disabled")
    # The ingress owns the adapter directory and the registry; a replica holds what requests bring it.
    replica_config = config.model_copy(update={"adapters_dir": None, "adapter_registry": None})
    deployment = serve.deployment(
        replica_class(config.max_cpu_adapters),
        name="engine",
        num_replicas=cluster.replicas,
        max_ongoing_requests=cluster.max_ongoing_requests or config.max_num_seqs,
        ray_actor_options={"num_cpus": cluster.replica_cpus, "num_gpus": cluster.replica_gpus},
    )
    return serve.run(deployment.bind(replica_config, cluster.threads), name=APP_NAME, route_prefix=None)


def build_cluster_state(config: EngineConfig, settings: ServerSettings, cluster: ClusterSettings) -> ServerState:
    """`build_state`'s twin for replicas: deploy them (blocking until each has loaded the model), then wire the
    ingress: the tokenizer, the cluster's adapter registry (directory, registry file), per-replica metrics."""
    tokenizer = load_tokenizer(resolve_model_path(config.model))  # built-in models are built here first, once
    handle = deploy(config, cluster)
    max_model_len, vocab_size = handle.limits.remote().result()
    adapters = None
    if config.max_gpu_adapters > 0:
        adapters = AdapterRegistry(
            lambda name, path: ClusterAdapter(check_name(name), as_source(path)),
            open_adapters(config.adapters_dir) if config.adapters_dir is not None else None,
            RegistryFile(config.adapter_registry) if config.adapter_registry is not None else None,
        )
        log.info("adapters: %s", ", ".join(adapters.restore() + adapters.register_directory()) or "none")
    client = ReplicaClient(handle, tokenizer, max_model_len, vocab_size, adapters,
                           on_shutdown=lambda: serve.delete(APP_NAME))
    metrics = ServerMetrics(None, replica_snapshots=client.replica_snapshots)
    metrics.registry.register(RoutingCollector(client))
    return ServerState(client, settings, metrics)


def run_cluster(config: EngineConfig, settings: ServerSettings, cluster: ClusterSettings, host: str, port: int) -> None:
    """`loradock serve --replicas N`: until SIGTERM or SIGINT, like a single server; then stop what was started."""
    started_here = connect(cluster.ray_address)
    try:
        asyncio.run(serve_until_signal(build_cluster_state(config, settings, cluster), host, port))
    finally:
        if started_here:
            serve.shutdown()
            ray.shutdown()
