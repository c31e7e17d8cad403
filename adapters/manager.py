"""Adapter tiers: disk -> host cache -> device slots, and who may use what.

    registry (name -> AdapterVersion)    caller threads: resolve, register, unregister (`registry`)
    disk reads + validation              a small thread pool, never the engine thread
    host cache (LRU, --max-cpu-adapters) engine thread
    device slots (--max-gpu-adapters)    engine thread, between steps: a copy into preallocated buffers

A request holds its AdapterVersion from submission to its end (a pin): a pinned version keeps its device slot
and its host copy. Unregistering or replacing a name affects new requests at once; in-flight requests finish
on the version they hold, which is freed when its last request ends.

An adapter's source is a local folder or an object-store URL (`store`), fetched into a local cache by the reader
pool before the same validation. With a registry file, what is registered or unregistered by name is saved at
once and registered again at start (`restore`). A mix of adapters (`merge`, `mixes`) is a version with a recipe:
built in the reader pool from the registered sources, then held and evicted as any other.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ..kernels.cpu_build import cache_root
from .directory import AdapterDirectory, check_name
from .dora import with_dora_scales
from .lora_attach import LoraLayer
from .merge import MergeRecipe
from .mixes import Mixes, has_weights
from .peft_format import (
    AdapterError,
    AdapterWeights,
    BaseModelInfo,
    read_adapter,
    weights_size_limit,
)
from .registry import AdapterRegistry, UnknownAdapter  # noqa: F401 - raised by its methods; callers import it here
from .registry_file import RegistryFile
from .stats import AdapterStats
from .store import AdapterStore, fetch_adapter, is_url

log = logging.getLogger("loradock.adapters")
_READS = itertools.count(1)  # numbers the reads of adapter weights in this process


def as_source(path: str | Path) -> str | Path:
    """An adapter's source as the manager keeps it: an object-store URL as given, a local folder as a Path."""
    return path if is_url(path) else Path(path)


@pydantic_dataclass(frozen=True)
class AdapterSummary:
    """What the admin API shows of one adapter version, and its response schema: plain data (a replica sends it to
    the ingress)."""

    name: str
    tier: Annotated[Literal["disk", "host", "device", "cluster"], Field(
        description="where the weights are: disk, host cache, device slot; cluster: registered on the replicas' "
        "ingress (each replica reads it on first use)")]
    path: str
    version: Annotated[int, Field(description="1 when the name is first loaded, one more at each reload")]
    rank: int | None
    targets: list[str] | None
    bytes: int | None
    sha256: str | None
    loaded_at: float | None
    registered_at: float
    requests_served: int
    in_flight: int
    merge: Annotated[dict | None, Field(description="a mix: the adapters, weights, method, density and seed it was "
                                        "made of (`POST /v1/adapters` with merge)")] = None


@dataclass(eq=False)
class AdapterVersion:
    """One loaded-or-loadable version of a named adapter. Mutated on the engine thread only."""

    name: str
    path: Path | str  # a local folder, or an object-store URL
    weights: AdapterWeights | None = None  # the host copy
    slot: int | None = None  # the device slot
    pins: int = 0  # requests in flight on this version
    last_used: float = 0.0
    loading: Future | None = None
    error: AdapterError | None = None
    retired: bool = False  # unregistered or replaced (set by the engine thread): freed when the last pin goes
    registered_at: float = field(default_factory=time.time)
    loaded_at: float | None = None  # wall-clock time its weights were last read from disk
    read_id: int = 0  # the read that gave its weights, never the same number twice in a process (prefix cache keys)
    requests_served: int = 0
    version: int = 1  # 1 when the name is first registered, one more at each replacement (reload)
    from_directory: bool = False  # registered on first use from the adapter directory, not by name
    recipe: MergeRecipe | None = None  # a mix: what it is made of

    def hold(self, weights: AdapterWeights) -> None:
        """Keep `weights`, just read."""
        self.weights, self.loaded_at, self.read_id = weights, time.time(), next(_READS)

    @property
    def tier(self) -> str:
        return "device" if self.slot is not None else "host" if self.weights is not None else "disk"

    def summary(self) -> AdapterSummary:
        weights = self.weights
        return AdapterSummary(
            name=self.name, tier=self.tier, path=str(self.path), version=self.version,
            rank=weights.max_rank if weights else None, targets=list(weights.target_names) if weights else None,
            bytes=weights.nbytes if weights else None, sha256=weights.sha256 if weights else None,
            loaded_at=self.loaded_at, registered_at=self.registered_at, requests_served=self.requests_served,
            in_flight=self.pins, merge=self.recipe.to_dict() if self.recipe is not None else None,
        )


class AdapterManager:
    def __init__(
        self,
        layers: dict[str, LoraLayer],
        base: BaseModelInfo,
        num_slots: int,
        max_cpu_adapters: int,
        max_rank: int,
        on_loaded: Callable[[AdapterVersion], None],
        directory: AdapterDirectory | AdapterStore | None = None,
        registry_file: RegistryFile | None = None,
    ):
        self.layers = layers
        self.base = base
        self.max_rank = max_rank
        self.max_cpu_adapters = max_cpu_adapters
        self.registry = AdapterRegistry(lambda name, path: AdapterVersion(check_name(name), as_source(path)),
                                        directory, registry_file)
        self.directory = directory  # adapters found here are registered on first use
        self.fetch_cache = cache_root() / "adapter-store"  # adapters fetched from an object store
        self.stats = AdapterStats()
        self._on_loaded = on_loaded  # called from a pool thread when a disk read ends; wakes the engine
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loradock-adapter-read")
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.slots: dict[int, AdapterVersion] = {}
        self.host: dict[AdapterVersion, None] = {}  # insertion-ordered: the host LRU, oldest first
        self.mixes = Mixes(self.registry, base, max_rank,
                           cache_root() / "mixes", self._pool,
                           lambda v: v.weights or self._load(v.path, v.name, v.recipe),
                           lambda name, source, recipe: AdapterVersion(name, source, recipe=recipe))

    # ---- caller threads --------------------------------------------------------------------------------

    def register(
        self, name: str, path: Path | str, replace: bool = False, weights: AdapterWeights | None = None,
        version_number: int | None = None, recipe: MergeRecipe | None = None,
    ) -> tuple[AdapterVersion, AdapterVersion | None]:
        """Make `name` resolve to the adapter at `path`: read on first use, or already read (`weights`); a mix's
        `recipe` with it. Returns the new version and the one it replaced, which the engine thread must then
        `retire`. `version_number` defaults to one more than the replaced version's."""
        version = AdapterVersion(check_name(name), as_source(path), recipe=recipe)
        if weights is not None:
            version.hold(weights)
        return version, self.registry.add(version, replace, version_number)

    def unregister(self, name: str) -> AdapterVersion:
        """New requests for `name` fail from now on (the directory does not bring it back). Returns the version,
        which the engine thread must `retire`."""
        return self.registry.remove(name)

    def get(self, name: str) -> AdapterVersion:
        """The registered version, whatever its state; an adapter folder of the directory is registered here."""
        return self.registry.get(name)

    def resolve(self, name: str) -> AdapterVersion:
        """The version a new request would use (a per-request mix's too); raises its AdapterError if it was refused."""
        return self.mixes.get(name) or self.registry.resolve(name)

    def registered(self) -> list[AdapterVersion]:
        return self.registry.registered()

    def names(self) -> set[str]:
        """Every name a request may use: the registered adapters and the directory's (unless unregistered)."""
        return self.registry.names()

    def register_directory(self) -> list[str]:
        """Register every adapter folder of the directory now (at start, so the admin list shows them)."""
        return self.registry.register_directory()

    def restore(self) -> list[str]:
        """Register again what the registry file holds (each read on first use); the names registered."""
        return self.registry.restore()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- engine thread ---------------------------------------------------------------------------------

    def pin(self, version: AdapterVersion) -> None:
        """A request starts using `version`: keep it resident; start reading it from disk if needed."""
        version.pins += 1
        version.requests_served += 1
        version.last_used = time.monotonic()
        if version in self.host:  # most recently used goes last in the host LRU
            del self.host[version]
            self.host[version] = None
        self._count_lookup(version)
        if version.weights is None and version.slot is None and version.loading is None:
            log.info("reading adapter %s from %s", version.name, version.path)
            version.loading = self.read(version.path, version.name, version.recipe)
            version.loading.add_done_callback(lambda _future: self._on_loaded(version))

    def read(self, path: Path | str, name: str, recipe: MergeRecipe | None = None) -> Future:
        """Read and validate an adapter in the reader pool (fetching it first from an object store; mixing a
        `recipe` whose folder holds no weights yet); the future holds its AdapterWeights or AdapterError."""
        return self._pool.submit(self._load, path, name, recipe)

    def _load(self, path: Path | str, name: str, recipe: MergeRecipe | None) -> AdapterWeights:
        if recipe is not None and not has_weights(path):
            return self.mixes.build(recipe, name, path if isinstance(path, Path) else None)
        return self._timed_read(as_source(path), name)

    def _timed_read(self, path: Path | str, name: str) -> AdapterWeights:
        started = time.perf_counter()
        if is_url(path):
            path = fetch_adapter(path, name, self.fetch_cache,
                                 lambda config: weights_size_limit(config, self.base, self.max_rank))
        weights = read_adapter(path, self.base, self.max_rank, name)
        self._check_slotted(weights)
        weights = with_dora_scales(weights, {module: layer.base for module, layer in self.layers.items()})
        self.stats.load_seconds.observe(time.perf_counter() - started)
        return weights

    def _check_slotted(self, weights: AdapterWeights) -> None:
        """AdapterError (no_slots) if the adapter adapts a module this server has no LoRA slots for: serving it
        without that module would not be the adapter."""
        missing = [module for module in weights.modules if module not in self.layers]
        if missing:
            short = sorted({module.rsplit(".", 1)[-1] for module in missing})
            raise AdapterError(
                f"adapter {weights.name!r}: it adapts {missing[0]}, which this server has no LoRA slots for: restart "
                f"it with --lora-target-modules naming {', '.join(short)} (with the other modules adapters target)",
                "no_slots",
            )

    def _count_lookup(self, version: AdapterVersion) -> None:
        on_device, on_host = version.slot is not None, version.weights is not None
        self.stats.lookups["device", "hit" if on_device else "miss"] += 1
        if not on_device:
            self.stats.lookups["host", "hit" if on_host else "miss"] += 1

    def unpin(self, version: AdapterVersion) -> None:
        version.pins -= 1
        version.last_used = time.monotonic()
        if version.pins == 0:
            if version.retired:
                self._free(version)
            else:
                self._trim_host()

    def retire(self, version: AdapterVersion) -> None:
        """The version is no longer registered: free it now, or when its last request ends."""
        version.retired = True
        if version.pins == 0:
            self._free(version)

    def finish_loading(self, version: AdapterVersion) -> AdapterError | None:
        """Take a finished disk read into the host cache. Returns the error if the adapter was refused."""
        future, version.loading = version.loading, None
        error = future.exception()
        if error is not None:
            if not isinstance(error, AdapterError):
                error = AdapterError(f"reading the adapter failed: {type(error).__name__}: {error}", code="read_failed")
            version.error = error
            log.warning("adapter %s refused: %s", version.name, version.error)
            return version.error
        if version.pins or not version.retired:  # retired while being read: kept only for the requests waiting on it
            version.hold(future.result())
            self._cache_on_host(version)
        return None

    def warm(self, version: AdapterVersion) -> None:
        """Put an already read version into the host cache and, if a slot is free or idle, on the device."""
        if version.retired or version.weights is None:
            return
        self._cache_on_host(version)
        self.ensure_slot(version)

    def ensure_slot(self, version: AdapterVersion) -> int | None:
        """The version's device slot, copying it in (evicting the least recently used idle slot) if needed.
        None while its weights are still on their way or every slot is pinned."""
        if version.slot is not None:
            return version.slot
        if version.weights is None:
            return None
        if not self.free_slots:
            idle = [v for v in self.slots.values() if v.pins == 0]
            if not idle:
                return None
            self._evict_slot(min(idle, key=lambda v: v.last_used))
        slot = self.free_slots.pop()
        for name, layer in self.layers.items():
            module = version.weights.modules.get(name)
            if module is None:
                layer.load_slot(slot, None, None, 0.0)
            else:
                layer.load_slot(slot, module.A, module.B, module.scale, module.dora_scale, module.bias)
        version.slot = slot
        self.slots[slot] = version
        return slot

    def _cache_on_host(self, version: AdapterVersion) -> None:
        self.host[version] = None
        self._trim_host()

    def _trim_host(self) -> None:
        """Drop the oldest idle host copies beyond --max-cpu-adapters (pinned ones stay until unpinned)."""
        while len(self.host) > self.max_cpu_adapters:
            victim = next((v for v in self.host if v.pins == 0), None)
            if victim is None:
                return
            del self.host[victim]
            victim.weights = None
            self.stats.evictions["host"] += 1

    def _evict_slot(self, version: AdapterVersion) -> None:
        del self.slots[version.slot]
        self.free_slots.append(version.slot)
        version.slot = None
        self.stats.evictions["device"] += 1

    def _free(self, version: AdapterVersion) -> None:
        """Drop every copy of a retired version: its device slot and its host weights."""
        if version.slot is not None:
            self._evict_slot(version)
        self.host.pop(version, None)
        version.weights = None
        if version.recipe is not None:
            self.mixes.discard(version.path)
