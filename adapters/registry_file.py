"""The adapter registry on disk (`--adapter-registry FILE|URL`): what was loaded or unloaded by name through the admin
API, so a restarted server, or a new replica's ingress, serves the same adapters.

    {"format": 1,
     "adapters": {"support-bot": {"source": "/adapters/support-bot", "version": 3},
                  "support-tone": {"source": "~/.cache/loradock/mixes/support-tone-<id>", "version": 1,
                                   "merge": {"adapters": [{"name": "support-bot", "weight": 0.7}, ...],
                                             "method": "linear", "density": null, "seed": 0}}, ...},
     "unloaded": ["old-adapter"]}          # adapter-directory names unloaded by the admin: not brought back

A local file is written atomically (a temporary file in the same folder, then os.replace): a crash leaves the old
state or the new one, never half of one. An object-store URL (s3://...) is written with one PUT, which the store
applies whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdapterError
from .merge import MergeRecipe
from .store import is_url, object_store

FORMAT = 1


@dataclass(frozen=True)
class RegistryEntry:
    source: str  # a local folder or an object-store URL
    version: int  # 1 when first loaded, one more at each reload
    merge: MergeRecipe | None = None  # a mix's recipe: mixed again from it if its folder is gone


@dataclass
class RegistryState:
    adapters: dict[str, RegistryEntry] = field(default_factory=dict)
    unloaded: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        adapters = {name: {"source": e.source, "version": e.version,
                           **({"merge": e.merge.to_dict()} if e.merge else {})}
                    for name, e in sorted(self.adapters.items())}
        return json.dumps({"format": FORMAT, "adapters": adapters, "unloaded": sorted(self.unloaded)}, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> RegistryState:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT}")
            adapters = {str(name): RegistryEntry(str(e["source"]), int(e["version"]),
                                                 MergeRecipe.from_dict(e["merge"]) if e.get("merge") else None)
                        for name, e in raw["adapters"].items()}
            return cls(adapters, [str(name) for name in raw.get("unloaded", [])])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise AdapterError(f"the adapter registry {where} cannot be read: {exc}; fix or remove it",
                               "bad_registry") from None


class RegistryFile:
    def __init__(self, location: str | Path):
        self.location = str(location)

    def load(self) -> RegistryState:
        """The saved state; empty if there is none yet."""
        try:
            with self._open("r") as f:
                return RegistryState.from_json(f.read(), self.location)
        except FileNotFoundError:
            return RegistryState()

    def _open(self, mode: str):
        """The registry file, on this machine or in an object store."""
        fs, path = object_store(self.location)
        return fs.open(path, mode, encoding="utf-8")

    def save(self, state: RegistryState) -> None:
        """Replace the saved state with `state` (callers save one at a time: the last save wins)."""
        text = state.to_json()
        if is_url(self.location):
            with self._open("w") as f:
                f.write(text)
            return
        path = Path(self.location)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
