"""Adapter tiers: disk -> host cache -> device slots, and who may use what.

    registry (name -> AdapterVersion)    caller threads: resolve, register, unregister (under a lock)
    disk reads + validation              a small thread pool, never the engine thread
    host cache (LRU, --max-cpu-adapters) engine thread
    device slots (--max-gpu-adapters)    engine thread, between steps: a copy into preallocated buffers

A request holds its AdapterVersion from submission to its end (a pin): a pinned version keeps its device slot
and its host copy. Unregistering or replacing a name affects new requests at once; in-flight requests finish
on the version they hold, which is freed when its last request ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .directory import AdapterDirectory, check_name
from .lora_layer import LoraLinear
from .peft_format import AdapterError, AdapterWeights, BaseModelInfo, read_adapter
from .stats import AdapterStats

log = logging.getLogger("loradock.adapters")


class UnknownAdapter(LookupError):
    """No adapter of that name is registered."""

    def __init__(self, name: str, reason: str = "no adapter of that name is registered"):
        super().__init__(f"unknown adapter {name!r}: {reason}")
        self.name = name


@dataclass(eq=False)
class AdapterVersion:
    """One loaded-or-loadable version of a named adapter. Mutated on the engine thread only."""

    name: str
    path: Path
    weights: AdapterWeights | None = None  # the host copy
    slot: int | None = None  # the device slot
    pins: int = 0  # requests in flight on this version
    last_used: float = 0.0
    loading: Future | None = None
    error: AdapterError | None = None
    retired: bool = False  # unregistered or replaced (set by the engine thread): freed when the last pin goes
    registered_at: float = field(default_factory=time.time)
    loaded_at: float | None = None  # wall-clock time its weights were last read from disk
    requests_served: int = 0

    @property
    def tier(self) -> str:
        return "device" if self.slot is not None else "host" if self.weights is not None else "disk"


class AdapterManager:
    def __init__(
        self,
        layers: dict[str, LoraLinear],
        base: BaseModelInfo,
        num_slots: int,
        max_cpu_adapters: int,
        max_rank: int,
        on_loaded: Callable[[AdapterVersion], None],
        directory: AdapterDirectory | None = None,
    ):
        self.layers = layers
        self.base = base
        self.max_rank = max_rank
        self.max_cpu_adapters = max_cpu_adapters
        self.directory = directory  # adapters found here are registered on first use
        self.stats = AdapterStats()
        self._on_loaded = on_loaded  # called from a pool thread when a disk read ends; wakes the engine
        self._registry: dict[str, AdapterVersion] = {}
        self._unloaded: set[str] = set()  # unregistered names the directory does not bring back until registered
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loradock-adapter-read")
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.slots: dict[int, AdapterVersion] = {}
        self.host: dict[AdapterVersion, None] = {}  # insertion-ordered: the host LRU, oldest first

    # ---- caller threads --------------------------------------------------------------------------------

    def register(
        self, name: str, path: Path, replace: bool = False, weights: AdapterWeights | None = None
    ) -> tuple[AdapterVersion, AdapterVersion | None]:
        """Make `name` resolve to the adapter at `path`: read on first use, or already read (`weights`).
        Returns the new version and the one it replaced, which the engine thread must then `retire`."""
        version = AdapterVersion(check_name(name), Path(path), weights=weights)
        if weights is not None:
            version.loaded_at = time.time()
        with self._lock:
            old = self._registry.get(name)
            if old is not None and not replace:
                raise AdapterError(f"an adapter named {name!r} is already registered", code="name_conflict")
            self._registry[name] = version
            self._unloaded.discard(name)
        return version, old

    def unregister(self, name: str) -> AdapterVersion:
        """New requests for `name` fail from now on (the directory does not bring it back). Returns the version,
        which the engine thread must `retire`."""
        with self._lock:
            version = self._registry.pop(name, None)
            if version is not None:
                self._unloaded.add(name)
        if version is None:
            raise UnknownAdapter(name)
        return version

    def get(self, name: str) -> AdapterVersion:
        """The registered version, whatever its state; an adapter folder of the directory is registered here."""
        with self._lock:
            version = self._registry.get(name)
            if version is None and self._from_directory(name):
                version = self._registry[name] = AdapterVersion(name, self.directory.path(name))
        if version is None:
            raise UnknownAdapter(name)
        return version

    def _from_directory(self, name: str) -> bool:
        return self.directory is not None and name not in self._unloaded and self.directory.holds(name)

    def resolve(self, name: str) -> AdapterVersion:
        """The version a new request would use; raises its AdapterError if it was refused."""
        version = self.get(name)
        if version.error is not None:
            raise version.error
        return version

    def registered(self) -> list[AdapterVersion]:
        with self._lock:
            return list(self._registry.values())

    def names(self) -> set[str]:
        """Every name a request may use: the registered adapters and the directory's (unless unregistered)."""
        with self._lock:
            names = set(self._registry)
            unloaded = set(self._unloaded)
        if self.directory is not None:
            names.update(name for name in self.directory.names() if name not in unloaded)
        return names

    def register_directory(self) -> list[str]:
        """Register every adapter folder of the directory now (at start, so the admin list shows them)."""
        return [self.get(name).name for name in self.directory.names()] if self.directory is not None else []

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
            version.loading = self.read(version.path, version.name)
            version.loading.add_done_callback(lambda _future: self._on_loaded(version))

    def read(self, path: Path, name: str) -> Future:
        """Read and validate an adapter in the reader pool; the future holds its AdapterWeights or AdapterError."""
        return self._pool.submit(self._timed_read, path, name)

    def _timed_read(self, path: Path, name: str) -> AdapterWeights:
        started = time.perf_counter()
        weights = read_adapter(path, self.base, self.max_rank, name)
        self.stats.load_seconds.observe(time.perf_counter() - started)
        return weights

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
        if not version.retired:  # a version retired while being read is not kept
            version.weights = future.result()
            version.loaded_at = time.time()
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
                layer.load_slot(slot, module.A, module.B, module.scale)
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
