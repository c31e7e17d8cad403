"""What the routes use of an engine: one interface, two implementations, so there is one implementation of the routes.

    Engine (serve/engine)                  one process: the engine thread owns the model
    ReplicaClient (serve/replica_client)   `loradock serve --replicas N`: engine replicas on Ray Serve

The routes call only what `EngineBackend` lists, and map its exceptions (UnknownAdapter, AdapterError, RequestError,
PromptTooLong, EngineShutdown, EngineLost) to OpenAI-shaped errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Protocol

from ...adapters.manager import AdapterSummary
from ...adapters.merge import MergeRecipe
from ..engine import GenerationOutput, SamplingParams


class EngineLost(RuntimeError):
    """The engine serving a request went away under it (a replica process died): that request failed, and only it;
    a retry is served elsewhere."""


class AdapterVersionView(Protocol):
    path: Path | str  # where the version was read from: a local folder or an object-store URL

    def summary(self) -> AdapterSummary: ...


class AdapterCatalog(Protocol):
    """The adapters a server knows: the engine's AdapterManager, or the ingress's registry of a cluster."""

    directory: Any  # AdapterDirectory | AdapterStore | None: where adapters are found and loaded by name

    def names(self) -> Iterable[str]: ...

    def registered(self) -> list[AdapterVersionView]: ...

    def get(self, name: str) -> AdapterVersionView: ...


class EngineBackend(Protocol):
    tokenizer: Any  # the model's Hugging Face tokenizer
    max_model_len: int
    adapters: AdapterCatalog | None  # None: adapters disabled

    def start(self) -> Any: ...

    def shutdown(self) -> None: ...

    def tokenize(self, prompt: str | list[int]) -> list[int]: ...

    def check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None: ...

    def resolve_adapter(self, name: str) -> Any: ...

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, adapter: str | None = None,
                 request_id: str | None = None, client: str | None = None, weight: float = 1.0,
                 cache_salt: str | None = None) -> AsyncIterator[GenerationOutput]: ...

    async def load_adapter(self, name: str, path: str | Path | None, replace: bool = False,
                           recipe: MergeRecipe | None = None) -> AdapterVersionView: ...

    async def mix_adapter(self, recipe: MergeRecipe) -> str: ...

    def unregister_adapter(self, name: str) -> None: ...
