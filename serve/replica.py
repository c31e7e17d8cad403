"""One engine replica of `loradock serve --replicas N`: a Ray Serve deployment whose every replica holds one Engine,
the same engine as a single server's, with its own device slots and host cache.

    ingress (ReplicaClient) ── ReplicaCall ──► generate: hold the adapter (multiplexed loader), run the engine
                            ◄── [GenerationOutput, ...] per batch of tokens, then one ReplicaReport

An adapter request names the registration the ingress's registry holds (`AdapterRef`): a replica that does not
hold it yet, or holds another, loads that one first, so a load, reload or a new replica needs no broadcast.
Engine errors travel as data (`Failure`) and are raised again by the client as the engine's own exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray import serve

from ..adapters.manager import AdapterSummary, UnknownAdapter
from ..adapters.peft_format import AdapterError
from .engine import Engine, EngineConfig, EngineShutdown, GenerationOutput, PromptTooLong, RequestError, SamplingParams
from .engine.threads import use_serving_threads
from .metrics import EngineSnapshot, snapshot
from .multiplex import adapter_loader


@dataclass(frozen=True)
class AdapterRef:
    """The adapter a request runs on, as the ingress's registry has it."""

    name: str
    source: str  # a local folder (the same path on every node) or an object-store URL
    version: int  # as the admin API shows it
    key: str  # this registration's own id: a name unloaded and loaded again restarts at version 1


@dataclass(frozen=True)
class ReplicaCall:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None
    request_id: str
    client: str | None = None  # whose fair share the request counts against (default: the adapter)
    weight: float = 1.0
    cache_salt: str | None = None  # cached prompt blocks are shared only within one salt


@dataclass(frozen=True)
class ReplicaReport:
    """A replica's state after a request: the ingress keeps each replica's latest for /metrics."""

    replica: str
    sequence: int  # this replica's reports in order: streams may deliver an older one last
    pid: int
    engine: EngineSnapshot
    # "hit": the replica held the adapter's registration when the request arrived; "miss": it loaded it first
    adapter_requests: dict[str, int]
    adapters: frozenset[str]  # the adapters Serve's multiplexing counts this replica as holding


_FAILURES = {"unknown_adapter": UnknownAdapter, "adapter": AdapterError, "prompt_too_long": PromptTooLong,
             "request": RequestError, "shutdown": EngineShutdown}


@dataclass(frozen=True)
class Failure:
    """An engine error sent as data; `exception()` is the same error on the ingress's side."""

    kind: str  # a key of _FAILURES
    message: str
    code: str = ""

    @classmethod
    def of(cls, error: Exception) -> Failure:
        kind = next(kind for kind, kind_type in _FAILURES.items() if isinstance(error, kind_type))  # subclass first
        if isinstance(error, UnknownAdapter):
            return cls(kind, error.name)
        return cls(kind, str(error), getattr(error, "code", ""))

    def exception(self) -> Exception:
        if self.kind == "unknown_adapter":
            return UnknownAdapter(self.message)
        if self.kind == "adapter":
            return AdapterError(self.message, self.code)
        return _FAILURES[self.kind](self.message)


_ENGINE_ERRORS = tuple(_FAILURES.values())
_END = object()


class _AdapterLease:
    """This replica's hold on one adapter, as Serve's multiplexing counts it: the registration loaded in the engine.
    Serve calls __del__ when it drops the adapter from this replica (least recently used), from a thread of its
    executor: the release runs on the replica's event loop, where every other change to the engine's adapters is
    made, after any load of this lease in progress. The engine unregisters it; its memory is freed once the requests
    on it end."""

    def __init__(self, engine: Engine, name: str, leases: dict):
        self.engine, self.name, self.leases = engine, name, leases
        self.key: str | None = None  # the registration held: AdapterRef.key
        self.refused: tuple[str, AdapterError] | None = None  # a registration that failed validation is not read again
        self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        leases[name] = self

    async def sync(self, ref: AdapterRef) -> None:
        async with self._lock:
            if self.key == ref.key:
                return
            if self.refused is not None and self.refused[0] == ref.key:
                raise self.refused[1]
            try:
                await self.engine.load_adapter(ref.name, ref.source, replace=True, version=ref.version)
            except AdapterError as error:
                self.refused = (ref.key, error)
                raise
            self.key = ref.key

    def __del__(self):
        with contextlib.suppress(RuntimeError):  # the loop is closed: the replica is going away
            asyncio.run_coroutine_threadsafe(self._release(), self._loop)

    async def _release(self) -> None:
        async with self._lock:
            if self.leases.get(self.name) is self:  # Serve's eviction, then the garbage collector: release once
                del self.leases[self.name]
                if self.key is not None:
                    with contextlib.suppress(UnknownAdapter):
                        self.engine.unregister_adapter(self.name)


class _EngineReplica:
    """The deployment's class, less its multiplexed loader `load(name)`, which `replica_class` adds."""

    def __init__(self, config: EngineConfig, threads: int):
        use_serving_threads(threads)
        self.engine = Engine.from_config(config).start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.leases: dict[str, _AdapterLease] = {}
        self.adapter_requests = Counter(hit=0, miss=0)
        self.reports = 0

    def limits(self) -> tuple[int, int]:
        """What the ingress checks requests against: the context (as the KV cache allows) and the vocabulary size."""
        return self.engine.max_model_len, self.engine.vocab_size

    async def hold(self, ref: AdapterRef) -> AdapterSummary | Failure:
        """Load the adapter's version here now (the admin API's load and reload: validated before it is answered)."""
        try:
            lease = await self.load(ref.name)
            await lease.sync(ref)
            return self.engine.resolve_adapter(ref.name).summary()
        except _ENGINE_ERRORS as error:
            return Failure.of(error)

    async def generate(self, call: ReplicaCall) -> AsyncIterator[list[GenerationOutput] | Failure | ReplicaReport]:
        try:
            async for batch in self._held_batches(call):
                yield batch
        except _ENGINE_ERRORS as error:
            yield Failure.of(error)
        yield self.report()

    async def _held_batches(self, call: ReplicaCall) -> AsyncIterator[list[GenerationOutput]]:
        """The call's batches with its adapter held. Serve may drop the adapter here (its LRU, for another request's)
        between the hold and the engine taking the request, which the engine then does not know: hold it again, once."""
        for last_try in (False, True):
            if call.adapter is not None:
                await self._hold_for_request(call.adapter)
            try:
                async for batch in self._batches(call):
                    yield batch
                return
            except UnknownAdapter:  # raised before the first token: nothing was sent yet
                if last_try or call.adapter is None:
                    raise

    async def _hold_for_request(self, ref: AdapterRef) -> None:
        lease = self.leases.get(ref.name)
        self.adapter_requests["hit" if lease is not None and lease.key == ref.key else "miss"] += 1
        lease = await self.load(ref.name)  # through Serve's multiplexing: its LRU, and what the router learns
        await lease.sync(ref)

    async def _batches(self, call: ReplicaCall) -> AsyncIterator[list[GenerationOutput]]:
        """The engine's outputs for the call, as many per message as came since the last one: when the stream back to
        the ingress is slower than the engine's steps, tokens travel together instead of queueing one by one."""
        queue: asyncio.Queue = asyncio.Queue()
        adapter = call.adapter.name if call.adapter is not None else None

        async def pump() -> None:
            try:
                async for output in self.engine.generate(call.prompt_ids, call.params, adapter=adapter,
                                                         request_id=call.request_id, client=call.client,
                                                         weight=call.weight, cache_salt=call.cache_salt):
                    queue.put_nowait(output)
                queue.put_nowait(_END)
            except _ENGINE_ERRORS as error:
                queue.put_nowait(error)

        task = asyncio.create_task(pump())
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                outputs = [item for item in items if isinstance(item, GenerationOutput)]
                if outputs:
                    yield outputs
                if isinstance(items[-1], Exception):
                    raise items[-1]
                if items[-1] is _END:
                    return
        finally:
            task.cancel()  # the caller went away: closing the engine's stream aborts the request

    def report(self) -> ReplicaReport:
        self.reports += 1
        return ReplicaReport(self.replica_id, self.reports, os.getpid(), snapshot(self.engine),
                             dict(self.adapter_requests), frozenset(self.leases))

    def __del__(self):
        self.engine.shutdown()


def replica_class(max_adapters: int) -> type:
    """The replica class with its multiplexed loader keeping at most `max_adapters` adapters per replica."""

    class EngineReplica(_EngineReplica):
        @adapter_loader(max_adapters)
        async def load(self, name: str) -> _AdapterLease:
            return _AdapterLease(self.engine, name, self.leases)

    return EngineReplica
