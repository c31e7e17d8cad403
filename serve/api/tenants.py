"""Tenants: API keys -> a tenant, the models it may use, its weight in fair scheduling and its limits.

`loradock serve --tenants FILE.yaml` reads them at start and again on SIGHUP:

    tenants:
      acme:
        keys: ["sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"]
        adapters: ["acme-*", "summarizer"]   # adapter names or globs (fnmatch, case-sensitive)
        base_model: true                     # may it call the base model (default false)
        weight: 2                            # its share in fair scheduling (default 1)
        requests_per_minute: 600             # limits (default: none)
        tokens_per_minute: 200000

Keys are stored as `sha256:` + the hex SHA-256 of the key (`python -m loradock.serve.api.tenants hash-key` reads a
key on stdin and prints that line); a presented key is hashed and compared with every stored digest in constant
time. A key may belong to one tenant only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TenantsError(ValueError):
    """The tenants file cannot be used; the message names the file and what is wrong."""


def hash_key(key: str) -> str:
    """The form a key is stored in: 'sha256:' + hex digest of its UTF-8 bytes."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class _TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(min_length=1)
    adapters: list[str] = Field(default_factory=list)
    base_model: bool = False
    weight: float = Field(default=1.0, gt=0)
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)

    @field_validator("keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not DIGEST.fullmatch(key):
                raise ValueError("keys are stored hashed, as 'sha256:' + 64 lowercase hex digits (python -m "
                                 "loradock.serve.api.tenants hash-key < key.txt prints one); a plain key is refused")
        return keys


class _TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, _TenantEntry] = Field(min_length=1)


@dataclass(frozen=True)
class Tenant:
    name: str
    adapters: tuple[str, ...]  # names or globs
    base_model: bool
    weight: float
    requests_per_minute: int | None
    tokens_per_minute: int | None

    def may_use(self, adapter: str | None) -> bool:
        """May this tenant call the adapter (None: the base model)?"""
        if adapter is None:
            return self.base_model
        return any(fnmatchcase(adapter, pattern) for pattern in self.adapters)


class Tenants:
    """The tenants of one reading of the file, and the digest of every key."""

    def __init__(self, tenants: dict[str, Tenant], digests: dict[str, str]):
        self.by_name = tenants
        self._digests = [(digest.encode(), name) for digest, name in digests.items()]  # digest -> tenant name

    @classmethod
    def load(cls, path: str | Path) -> Tenants:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise TenantsError(f"--tenants {path}: {exc}") from None
        try:
            parsed = _TenantsFile.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}" for e in exc.errors())
            raise TenantsError(f"--tenants {path}: {problems}") from None
        tenants, digests = {}, {}
        for name, entry in parsed.tenants.items():
            if not TENANT_NAME.fullmatch(name):
                raise TenantsError(f"--tenants {path}: tenant name {name!r}: use up to 64 letters, digits, '.', "
                                   "'_' and '-'")
            for digest in entry.keys:
                if digests.setdefault(digest, name) != name:
                    raise TenantsError(f"--tenants {path}: a key of {name!r} also belongs to {digests[digest]!r}")
            tenants[name] = Tenant(name, tuple(entry.adapters), entry.base_model, entry.weight,
                                   entry.requests_per_minute, entry.tokens_per_minute)
        return cls(tenants, digests)

    def identify(self, key: str) -> Tenant | None:
        """The tenant whose key this is; every stored digest is compared, in constant time."""
        if not key:
            return None
        given = hash_key(key).encode()
        found = None
        for digest, name in self._digests:
            if hmac.compare_digest(given, digest):
                found = name
        return self.by_name[found] if found is not None else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["hash-key"]:
        print("usage: python -m loradock.serve.api.tenants hash-key < key.txt   (prints the key's stored form)",
              file=sys.stderr)
        return 2
    key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        print("hash-key: no key on stdin", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
