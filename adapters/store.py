"""Adapters in an object store (`--adapters s3://bucket/prefix`, through fsspec): listed there, fetched on first use
into a local cache, then read and validated exactly as a local adapter folder.

    s3://bucket/prefix/<name>/adapter_config.json         one adapter per sub-prefix, named by it
    s3://bucket/prefix/<name>/adapter_model.safetensors

Only those two objects are ever downloaded: a folder holding only adapter_model.bin is refused without fetching it,
and the weights object's size is checked against what its config allows on this base model before it is fetched.
Nothing from the bucket names a local path: the cache folder is a digest of the URL and the objects' ETags, so a
changed object is fetched again and a hostile key (`..`, `/`) cannot reach outside the cache. Credentials and the
endpoint come from the usual AWS settings (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL_S3`, ...) that s3fs reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import fsspec

from .directory import CONFIG_FILE, AdapterDirectory, check_name, is_valid_name
from .errors import AdapterError
from .peft_format import MAX_CONFIG_BYTES, PICKLE_FILE, WEIGHTS_FILE, read_config_file


def is_url(source: object) -> bool:
    """Whether an adapter's source is an object-store URL (anything but a local path)."""
    return isinstance(source, str) and "://" in source and not source.startswith("file://")


def object_store(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of an object-store URL; AdapterError (missing_extra) naming what to install when
    the protocol's filesystem package is absent (s3fs comes with loradock's s3 extra)."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:
        protocol = url.split("://", 1)[0]
        install = ("pip install 'loradock[s3]'" if protocol in ("s3", "s3a")
                   else f"install the fsspec filesystem for {protocol}:// ({error})")
        raise AdapterError(f"{url}: {protocol}:// needs a package that is not installed: {install}",
                           "missing_extra") from None


class AdapterStore:
    """AdapterDirectory's twin for a URL: the same questions (names, holds, path, contains), asked of the store."""

    def __init__(self, url: str):
        self.root = url.rstrip("/")
        self.fs, self._path = object_store(self.root)
        self.protocol = self.root.split("://", 1)[0]

    def path(self, name: str) -> str:
        """The adapter's URL; AdapterError (bad_name) if the name could not be a folder of the store."""
        return f"{self.root}/{check_name(name)}"

    def holds(self, name: str) -> bool:
        if not is_valid_name(name):
            return False
        key = f"{self._path}/{name}/{CONFIG_FILE}"
        self.fs.invalidate_cache(f"{self._path}/{name}")  # an adapter dropped in since the last look counts
        return self.fs.isfile(key)

    def names(self) -> list[str]:
        """Every adapter folder in the store (sub-prefixes holding a config whose name is a valid adapter name)."""
        self.fs.invalidate_cache(self._path)
        found = self.fs.glob(f"{self._path}/*/{CONFIG_FILE}")
        return sorted(name for name in (PurePosixPath(key).parent.name for key in found) if is_valid_name(name))

    def contains(self, source: str | Path) -> bool:
        """Whether `source` is the URL of a folder directly inside the store."""
        if not is_url(source):
            return False
        parent, _, name = str(source).rstrip("/").rpartition("/")
        return parent == self.root and is_valid_name(name)


def fetch_adapter(url: str, name: str, cache_dir: Path, weights_limit: Callable[[dict], int]) -> Path:
    """The adapter folder at `url` as a local folder in `cache_dir` (fetched unless the same objects are cached).
    `weights_limit(config)` gives the largest weights file the config allows; AdapterError, message starting with
    the adapter's name, for anything refused."""
    try:
        return _fetch(url, cache_dir, weights_limit)
    except AdapterError as error:
        raise AdapterError(f"adapter {name!r}: {error}", error.code) from None
    except (OSError, ValueError) as error:  # the store is unreachable, the bucket is missing, credentials refused
        raise AdapterError(f"adapter {name!r}: cannot fetch {url}: {type(error).__name__}: {error}",
                           "missing_file") from None


def _fetch(url: str, cache_dir: Path, weights_limit: Callable[[dict], int]) -> Path:
    fs, path = object_store(url)
    fs.invalidate_cache(path)
    try:
        objects = {PurePosixPath(entry["name"]).name: entry for entry in fs.ls(path, detail=True)}
    except FileNotFoundError:
        objects = {}
    config, weights = objects.get(CONFIG_FILE), objects.get(WEIGHTS_FILE)
    if config is None or config["type"] != "file":
        raise AdapterError(f"{url} has no {CONFIG_FILE}: it is not a PEFT adapter folder", "missing_file")
    if config["size"] > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES >> 20} MiB", "bad_config")
    if weights is None or weights["type"] != "file":
        if PICKLE_FILE in objects:
            raise AdapterError(f"only {PICKLE_FILE} is in the store: loradock reads safetensors only and never "
                               f"fetches or unpickles a pickle file; save the adapter as {WEIGHTS_FILE}",
                               "pickle_weights")
        raise AdapterError(f"{url} has no {WEIGHTS_FILE}", "missing_file")
    folder = cache_dir / _digest(url, config, weights)
    if (folder / WEIGHTS_FILE).is_file():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache_dir))
    try:
        fs.get_file(config["name"], staging / CONFIG_FILE)
        limit = weights_limit(read_config_file(staging))
        if weights["size"] > limit:
            raise AdapterError(
                f"{WEIGHTS_FILE} is {weights['size']} bytes in the store, more than any adapter with this config can "
                f"be on this base model within the rank limit ({limit} bytes): not fetched", "too_large")
        fs.get_file(weights["name"], staging / WEIGHTS_FILE)
        if (staging / WEIGHTS_FILE).stat().st_size != weights["size"]:
            raise AdapterError(f"{WEIGHTS_FILE} changed in the store while it was fetched: try again", "corrupt_file")
        try:
            os.replace(staging, folder)  # readers see the whole folder or none of it
        except OSError:  # another reader fetched the same objects first
            if not (folder / WEIGHTS_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _digest(url: str, *entries: dict) -> str:
    """The cache folder's name: the URL and what identifies each object's content (ETag, else size and mtime)."""
    marks = [url] + [[entry.get("ETag") or entry.get("etag"), entry["size"], str(entry.get("LastModified") or
                      entry.get("mtime") or "")] for entry in entries]
    return hashlib.sha256(json.dumps(marks, default=str).encode()).hexdigest()[:32]


def open_adapters(location: str | Path) -> AdapterDirectory | AdapterStore:
    """`--adapters`: a local folder, or an object-store URL."""
    return AdapterStore(location) if is_url(location) else AdapterDirectory(location)
