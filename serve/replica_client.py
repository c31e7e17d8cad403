"""The ingress's engine when serving with `--replicas N`: the routes' engine interface (`api.backend.EngineBackend`)
over the engine replicas of a Ray Serve deployment, reached through a DeploymentHandle.

    tokenize, check_fits        here, with the model's tokenizer and a replica's context limit
    generate(adapter=None)      any replica (Ray's load balancing)
    generate(adapter=name)      a replica holding the adapter if one has room (multiplexing), with the registration
                                the registry here holds (name, source, version, key): a replica without it loads it
    load / reload               one replica loads and validates the version (it is answered then); the registry
                                records it (and saves it with --adapter-registry); every replica loads it on first use
    unload                      new requests get 404 at once; requests in flight finish on every replica

The registry here is the cluster's: replicas consult it through the registration each request carries, so a
replica restarted by Ray, or one added later, serves the same adapters without being told.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import ray.exceptions
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray.serve.handle import DeploymentHandle

from ..adapters.directory import check_name
from ..adapters.manager import AdapterSummary, as_source
from ..adapters.merge import MergeRecipe
from ..adapters.peft_format import AdapterError
from ..adapters.registry import AdapterRegistry, UnknownAdapter
from .api.backend import EngineLost
from .engine import GenerationOutput, SamplingParams
from .engine.engine import check_fits, check_logit_bias, encode_prompt
from .metrics import EngineSnapshot
from .multiplex import routed
from .replica import AdapterRef, Failure, ReplicaCall, ReplicaReport



def _no_mixes() -> AdapterError:
    return AdapterError("mixes of adapters are served by one engine, not yet by replicas (--replicas)",
                        "unsupported_feature")


@dataclass(eq=False)
class ClusterAdapter:
    """One version of a named adapter in the cluster's registry."""

    name: str
    path: Path | str  # a local folder (the same path on every node) or an object-store URL
    version: int = 1
    from_directory: bool = False
    error: AdapterError | None = None  # stays None here: each replica refuses a bad adapter itself
    registered_at: float = field(default_factory=time.time)
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # what replicas compare: unique per registration
    loaded: AdapterSummary | None = None  # what the replica that validated it reported
    requests_served: int = 0
    in_flight: int = 0

    def ref(self) -> AdapterRef:
        return AdapterRef(self.name, str(self.path), self.version, self.key)

    def summary(self) -> AdapterSummary:
        counts = dict(tier="cluster", path=str(self.path), version=self.version, registered_at=self.registered_at,
                      requests_served=self.requests_served, in_flight=self.in_flight)
        if self.loaded is not None:
            return dataclasses.replace(self.loaded, **counts)
        return AdapterSummary(name=self.name, rank=None, targets=None, bytes=None, sha256=None, loaded_at=None,
                              **counts)


class ReplicaClient:
    def __init__(self, handle: DeploymentHandle, tokenizer, max_model_len: int, vocab_size: int,
                 adapters: AdapterRegistry[ClusterAdapter] | None, on_shutdown=None):
        """on_shutdown(): stops the deployment (`running_server` calls `shutdown` on exit)."""
        self.handle = handle
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.adapters = adapters
        self.replicas: dict[str, ReplicaReport] = {}  # each replica's latest report, by replica id
        self._on_shutdown = on_shutdown

    def start(self) -> ReplicaClient:
        return self  # the replicas started when the deployment was deployed

    def shutdown(self) -> None:
        if self._on_shutdown is not None:
            self._on_shutdown()

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, self.vocab_size, prompt)

    def check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_fits(self.max_model_len, prompt_ids, params)
        check_logit_bias(self.vocab_size, params)

    def _registry(self, name: str) -> AdapterRegistry[ClusterAdapter]:
        if self.adapters is None:
            raise UnknownAdapter(name, "adapters are disabled (--max-gpu-adapters 0)")
        return self.adapters

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None, adapter: str | None = None,
                       request_id: str | None = None, client: str | None = None, weight: float = 1.0,
                       cache_salt: str | None = None) -> AsyncIterator[GenerationOutput]:
        """The engine's `generate`, run on a replica. EngineLost if the replica dies before the request ends."""
        params = params or SamplingParams()
        prompt_ids = self.tokenize(prompt)
        self.check_fits(prompt_ids, params)
        version = self.resolve_adapter(adapter) if adapter is not None else None
        call = ReplicaCall(prompt_ids, params, version.ref() if version else None, request_id or uuid.uuid4().hex,
                           client, weight, cache_salt)
        stream = routed(self.handle, adapter).generate.remote(call)
        if version is not None:
            version.requests_served += 1
            version.in_flight += 1
        finished = False
        try:
            async for item in stream:
                if isinstance(item, ReplicaReport):
                    self._keep(item)
                elif isinstance(item, Failure):
                    raise item.exception()
                else:
                    for output in item:
                        finished = output.finish_reason is not None
                        yield output
        except ray.exceptions.RayError as error:
            raise EngineLost(f"the replica serving this request failed ({type(error).__name__}); other requests go "
                             f"on, and a retry is served by a live replica") from None
        finally:
            if version is not None:
                version.in_flight -= 1
            if not finished:
                stream.cancel()  # the caller left early: the replica's stream closes and aborts the request

    async def mix_adapter(self, recipe: MergeRecipe) -> str:
        raise _no_mixes()

    def resolve_adapter(self, name: str) -> ClusterAdapter:
        return self._registry(name).resolve(name)

    async def load_adapter(self, name: str, path: str | Path | None, replace: bool = False,
                           recipe: MergeRecipe | None = None) -> ClusterAdapter:
        """One replica reads and validates the version and keeps it warm; then new requests get it everywhere.
        AdapterError if refused, or if the name is taken and not `replace`, or for a mix (`recipe`)."""
        if recipe is not None:
            raise _no_mixes()
        registry = self._registry(name)
        check_name(name)
        current = next((v for v in registry.registered() if v.name == name), None)
        if current is not None and not replace:
            raise AdapterError(f"an adapter named {name!r} is already registered", code="name_conflict")
        version = ClusterAdapter(name, as_source(path), current.version + 1 if current is not None else 1)
        try:
            loaded = await routed(self.handle, name, stream=False).hold.remote(version.ref())
        except ray.exceptions.RayError as error:
            raise EngineLost(f"the replica loading {name!r} failed ({type(error).__name__}): try again") from None
        if isinstance(loaded, Failure):
            raise loaded.exception()
        version.loaded = loaded
        registry.add(version, replace, version.version)
        return version

    def unregister_adapter(self, name: str) -> None:
        self._registry(name).remove(name)

    def _keep(self, report: ReplicaReport) -> None:
        latest = self.replicas.get(report.replica)
        if latest is None or latest.sequence < report.sequence:
            self.replicas[report.replica] = report

    def replica_snapshots(self) -> dict[str, EngineSnapshot]:
        """Each replica's engine as of its latest report, by replica id (for /metrics)."""
        return {replica: report.engine for replica, report in list(self.replicas.items())}


class RoutingCollector:
    """How well requests find their adapter, and how many each replica holds, from the replicas' reports."""

    def __init__(self, client: ReplicaClient):
        self.client = client

    def describe(self):
        return []

    def collect(self):
        family = CounterMetricFamily(
            "loradock_replica_adapter_requests", "Adapter requests by the replica they reached and whether it held "
            "the adapter's version already (hit) or loaded it first (miss)", labels=["replica", "result"])
        held = GaugeMetricFamily("loradock_replica_adapters", "Adapters a replica holds (the router sends their "
                                 "requests there first)", labels=["replica"])
        for replica, report in list(self.client.replicas.items()):
            for result, count in report.adapter_requests.items():
                family.add_metric([replica, result], count)
            held.add_metric([replica], len(report.adapters))
        yield family
        yield held
