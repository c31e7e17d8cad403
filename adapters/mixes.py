"""Where mixes (`merge.py`) are built and kept: named mixes as PEFT folders, per-request mixes by their recipe's digest.

    named mix        POST /v1/adapters {"name", "merge"}: written as a PEFT adapter folder under the cache
                     (mixes/<name>-<id>), read back and validated like any adapter, registered with its recipe. It owns
                     its weights: reloading a source does not change it, and an evicted mix is read again from its
                     folder; a folder gone at a restart is mixed again from the recipe. Reloading the mix mixes it
                     again from its sources as they are then; its folder is deleted once it is unloaded or replaced.
    per-request mix  "adapters": [...] in a completion: named mix:<digest of the recipe and its sources' versions>,
                     built once in the reader pool, then kept in the host cache and evicted like any adapter (mixed
                     again on its next use). A reloaded source gives a new digest, hence a new mix.

Builds run in the adapter reader pool, never on the event loop or the engine thread.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .errors import AdapterError
from .merge import MergeRecipe, MixError, check_recipe, mix_adapters
from .peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterWeights, BaseModelInfo, read_adapter
from .registry import AdapterRegistry, UnknownAdapter

PREFIX = "mix:"  # per-request mixes' names: never a valid adapter name, so never a registered one
_KEPT = 256  # per-request mixes remembered by digest (their weights live in the host cache, which evicts them)


class Mixes:
    """The manager's mixes: builds them from its registered sources and keeps the per-request ones by digest."""

    def __init__(self, registry: AdapterRegistry, base: BaseModelInfo, max_rank: int,
                 root: Path, pool: ThreadPoolExecutor, weights_of: Callable[[Any], AdapterWeights],
                 make: Callable[[str, str, MergeRecipe], Any]):
        """weights_of(version): a source's weights, its host copy or read now (in the pool's thread); make(name, source, recipe): a new version
        of a per-request mix."""
        self.registry = registry
        self.base = base
        self.max_rank = max_rank
        self.root = root  # named mixes' folders
        self._pool = pool
        self._weights_of = weights_of
        self._make = make
        self._per_request: dict[str, Future] = {}  # name -> Future of its version, oldest first
        self._lock = threading.Lock()

    def folder(self, name: str) -> Path:
        """A new folder for the named mix `name` (each build of a name gets its own: versions in flight keep theirs)."""
        return self.root / f"{name}-{uuid.uuid4().hex[:12]}"

    def discard(self, path: Path | str) -> None:
        """Delete the folder of a named mix no longer registered (in the pool: the engine thread does no file work)."""
        if isinstance(path, Path) and path.parent == self.root:
            self._pool.submit(shutil.rmtree, path, True)

    def build(self, recipe: MergeRecipe, name: str, folder: Path | None = None) -> AdapterWeights:
        """The mix of the sources registered now (pool thread); with `folder`, written there as a PEFT adapter and
        read back through the adapter checks. MixError (an AdapterError) when it cannot be mixed."""
        sources = [self._weights_of(self._source(source)) for source, _ in recipe.adapters]
        mix = mix_adapters(name, recipe, sources, self.base, self.max_rank)
        if folder is None:
            return mix
        _write(mix, folder)
        try:
            return read_adapter(folder, self.base, self.max_rank, name)
        except AdapterError:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _source(self, name: str):
        try:
            return self.registry.resolve(name)
        except UnknownAdapter:
            raise MixError(f"the mix names an unknown adapter {name!r}", "unknown_adapter", "adapters") from None

    def per_request(self, recipe: MergeRecipe) -> tuple[Future, bool]:
        """The per-request mix of `recipe` on the sources' current versions (caller thread): a Future of its version,
        and whether this call started the build (its caller puts the new version in the host cache)."""
        check_recipe(recipe)
        sources = [self._source(source) for source, _ in recipe.adapters]
        name = PREFIX + recipe.digest(*[(v.name, v.version, v.registered_at) for v in sources])
        with self._lock:
            future = self._per_request.get(name)
            if future is not None and not (future.done() and future.exception() is not None):
                return future, False
            future = self._pool.submit(self._new_version, recipe, name)
            self._per_request[name] = future
            excess = len(self._per_request) - _KEPT
            for old in [k for k, f in self._per_request.items() if f.done()][: max(excess, 0)]:
                del self._per_request[old]
        return future, True

    def _new_version(self, recipe: MergeRecipe, name: str):
        version = self._make(name, name, recipe)
        version.hold(self.build(recipe, name))
        return version

    def get(self, name: str):
        """The per-request mix of that name once built, else None."""
        with self._lock:
            future = self._per_request.get(name)
        if future is None or not future.done() or future.exception() is not None:
            return None
        return future.result()


def _write(mix: AdapterWeights, folder: Path) -> None:
    """`mix` as a PEFT adapter folder (adapter_config.json, adapter_model.safetensors), written whole or not at all."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mix-", dir=folder.parent))
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(mix.config, indent=1))
        tensors = {}
        for module, weights in mix.modules.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = weights.A.contiguous()  # [r, in]
            tensors[f"base_model.model.{module}.lora_B.weight"] = weights.B.contiguous()  # [out, r]
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        os.replace(staging, folder)
    except OSError as error:
        raise AdapterError(f"the mix cannot be written to {folder}: {error}", "missing_file") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def has_weights(path: Path | str) -> bool:
    """Whether a named mix's folder holds its weights (else it is mixed again from its recipe)."""
    return isinstance(path, Path) and (path / WEIGHTS_FILE).is_file()

