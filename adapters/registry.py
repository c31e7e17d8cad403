"""The adapter registry: which version of each named adapter new requests use (thread-safe).

Names come from registrations (the admin API, the Python API, the registry file at start) and from the adapter
directory or store, whose adapters are registered on first use. A name unregistered by the admin is not brought back
by the directory until registered again. With a registry file, every registration and unregistration by name is
saved at once (`registry_file`), and `restore` registers the saved ones again at start (a mix with its recipe,
after the sources it was made of, which were registered before it).

One registry serves the engine (versions it reads and holds: `manager.AdapterVersion`) and the ingress of engine
replicas (versions it routes by: the replica client's); both versions carry `name`, `path`, `version`,
`from_directory` and `error`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from .directory import AdapterDirectory
from .errors import AdapterError
from .registry_file import RegistryEntry, RegistryFile, RegistryState
from .store import AdapterStore


class UnknownAdapter(LookupError):
    """No adapter of that name is registered."""

    def __init__(self, name: str, reason: str = "no adapter of that name is registered"):
        super().__init__(f"unknown adapter {name!r}: {reason}")
        self.name = name


V = TypeVar("V")


class AdapterRegistry(Generic[V]):
    def __init__(
        self,
        make: Callable[[str, str | Path], V],
        directory: AdapterDirectory | AdapterStore | None = None,
        registry_file: RegistryFile | None = None,
    ):
        """make(name, source): a new, unread version (the directory's adapters and the registry file's)."""
        self.make = make
        self.directory = directory  # adapters found here are registered on first use
        self.registry_file = registry_file  # registrations by name are saved here
        self._versions: dict[str, V] = {}
        self._unloaded: set[str] = set()  # unregistered names the directory does not bring back until registered
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()  # one save at a time, each of the state as it is then

    def add(self, version: V, replace: bool = False, number: int | None = None) -> V | None:
        """Make `version.name` resolve to `version`, numbered `number` (default: one more than the version it
        replaces, else 1). Returns the replaced version; AdapterError (name_conflict) if taken and not `replace`."""
        name = version.name
        with self._lock:
            old = self._versions.get(name)
            if old is not None and not replace:
                raise AdapterError(f"an adapter named {name!r} is already registered", code="name_conflict")
            version.version = number or (old.version + 1 if old is not None else 1)
            self._versions[name] = version
            self._unloaded.discard(name)
        self._save()
        return old

    def remove(self, name: str) -> V:
        """New requests for `name` fail from now on (the directory does not bring it back); the removed version."""
        with self._lock:
            version = self._versions.pop(name, None)
            if version is not None:
                self._unloaded.add(name)
        if version is None:
            raise UnknownAdapter(name)
        self._save()
        return version

    def get(self, name: str) -> V:
        """The registered version, whatever its state; an adapter folder of the directory is registered here."""
        with self._lock:
            version = self._versions.get(name)
            maybe_directory = version is None and self.directory is not None and name not in self._unloaded
        if maybe_directory and self.directory.holds(name):  # outside the lock: a store's answer is a network call
            found = self.make(name, self.directory.path(name))
            found.from_directory = True
            with self._lock:
                version = self._versions.setdefault(name, found)
        if version is None:
            raise UnknownAdapter(name)
        return version

    def resolve(self, name: str) -> V:
        """The version a new request would use; raises its AdapterError if it was refused."""
        version = self.get(name)
        if version.error is not None:
            raise version.error
        return version

    def registered(self) -> list[V]:
        with self._lock:
            return list(self._versions.values())

    def names(self) -> set[str]:
        """Every name a request may use: the registered adapters and the directory's (unless unregistered)."""
        with self._lock:
            names = set(self._versions)
            unloaded = set(self._unloaded)
        if self.directory is not None:
            names.update(name for name in self.directory.names() if name not in unloaded)
        return names

    def register_directory(self) -> list[str]:
        """Register every adapter folder of the directory now (at start, so the admin list shows them), but those
        unregistered by name."""
        if self.directory is None:
            return []
        with self._lock:
            unloaded = set(self._unloaded)
        return [self.get(name).name for name in self.directory.names() if name not in unloaded]

    def restore(self) -> list[str]:
        """Register again what the registry file holds (each read on first use); the names registered."""
        if self.registry_file is None:
            return []
        state = self.registry_file.load()
        with self._lock:
            self._unloaded.update(state.unloaded)
            for name, entry in state.adapters.items():
                version = self.make(name, entry.source)
                version.version = entry.version
                if entry.merge is not None:
                    version.recipe = entry.merge
                self._versions[name] = version
        return sorted(state.adapters)

    def _save(self) -> None:
        if self.registry_file is None:
            return
        with self._save_lock:
            with self._lock:
                state = RegistryState(
                    {name: RegistryEntry(str(v.path), v.version, _recipe(v)) for name, v in self._versions.items()
                     if not v.from_directory},
                    sorted(self._unloaded),
                )
            self.registry_file.save(state)


def _recipe(version):
    """A mix's recipe (merge.MergeRecipe); None for an adapter read from its source."""
    return getattr(version, "recipe", None)  # the ingress's versions of a cluster have none
