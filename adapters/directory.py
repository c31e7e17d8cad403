"""The adapter directory (`--adapters DIR`): one PEFT adapter per subfolder, named by its folder.

Names are folder names, so they are checked before they touch the file system: letters, digits, '.', '_', '-', no
separators, no '..'; and a subfolder (or a symlink) that resolves outside the directory is not an adapter of it.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import AdapterError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CONFIG_FILE = "adapter_config.json"


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(_NAME.match(name)) and ".." not in name


def check_name(name: object) -> str:
    """The name itself, or AdapterError (code bad_name) saying what a name may hold."""
    if not is_valid_name(name):
        raise AdapterError(
            f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' (no path separators, no '..')",
            code="bad_name",
        )
    return name


class AdapterDirectory:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise AdapterError(f"the adapter directory {root} does not exist or is not a directory", "missing_file")

    def path(self, name: str) -> Path:
        """root/name with links resolved; AdapterError if the name is invalid (bad_name) or the folder leads
        outside the directory, or into a symlink loop (bad_path)."""
        check_name(name)
        try:
            root, path = self.root.resolve(), (self.root / name).resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise AdapterError(f"adapter {name!r} cannot be read: {exc}", code="bad_path") from None
        if path.parent != root:
            raise AdapterError(f"adapter {name!r} leads outside the adapter directory", code="bad_path")
        return path

    def holds(self, name: str) -> bool:
        """Whether root/name is a valid name for an adapter folder inside the directory with a config file."""
        try:
            return (self.path(name) / CONFIG_FILE).is_file()
        except AdapterError:
            return False

    def names(self) -> list[str]:
        """Every adapter folder in the directory, sorted."""
        return sorted(entry.name for entry in self.root.iterdir() if is_valid_name(entry.name) and self.holds(entry.name))

    def contains(self, path: str | Path) -> bool:
        """Whether `path` (links resolved) is a folder directly inside the directory."""
        return Path(path).resolve().parent == self.root.resolve()
