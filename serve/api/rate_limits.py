"""Per-tenant limits: a token bucket of requests per minute and one of tokens per minute.

A bucket holds at most a minute's allowance and refills continuously (allowance / 60 per second). A request costs
one request and `prompt tokens + max_tokens` tokens, taken at admission when both buckets hold that much (or are
full, so a request larger than a minute's tokens still passes, leaving the bucket in debt); when it ends, the
tokens it did not generate go back. A refused request takes nothing and learns how long until it would pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from .tenants import Tenant, Tenants


class RateLimited(Exception):
    def __init__(self, tenant: Tenant, reason: str, limit: int, retry_after: float):
        per = reason.removesuffix("_per_minute")
        super().__init__(f"tenant {tenant.name!r} is over its limit of {limit} {per} per minute; retry after "
                         f"{math.ceil(retry_after)} s")
        self.reason = reason  # requests_per_minute | tokens_per_minute
        self.retry_after = retry_after  # seconds


@dataclass
class TokenBucket:
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds `amount` (or is full); 0 if it does now."""
        needed = min(amount, self.capacity) - self.level
        return max(needed, 0.0) * 60 / self.capacity

    def resize(self, capacity: float, now: float) -> None:
        self.refill(now)
        self.capacity = capacity
        self.level = min(self.level, capacity)


class RateLimits:
    """The buckets of every tenant with a limit, kept across reloads of the tenants file."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}  # (tenant, requests|tokens) -> bucket

    def configure(self, tenants: Tenants | None) -> None:
        """Follow the tenants file: new limits start full, changed ones keep their level (at most the new size),
        removed ones go."""
        now = self.clock()
        wanted = {}
        for tenant in (tenants.by_name.values() if tenants is not None else ()):
            for kind, limit in (("requests", tenant.requests_per_minute), ("tokens", tenant.tokens_per_minute)):
                if limit is not None:
                    wanted[(tenant.name, kind)] = limit
        for key in set(self._buckets) - set(wanted):
            del self._buckets[key]
        for key, limit in wanted.items():
            bucket = self._buckets.get(key)
            if bucket is None:
                self._buckets[key] = TokenBucket(limit, limit, now)
            else:
                bucket.resize(limit, now)

    def admit(self, tenant: Tenant, tokens: int) -> None:
        """Take one request and `tokens` tokens from the tenant's buckets, or raise RateLimited taking nothing."""
        now = self.clock()
        wants = []
        for kind, amount in (("requests", 1), ("tokens", tokens)):
            bucket = self._buckets.get((tenant.name, kind))
            if bucket is None:
                continue
            bucket.refill(now)
            wait = bucket.wait_for(amount)
            if wait > 0:
                raise RateLimited(tenant, f"{kind}_per_minute", int(bucket.capacity), wait)
            wants.append((bucket, amount))
        for bucket, amount in wants:
            bucket.level -= amount

    def refund(self, tenant: Tenant, tokens: int) -> None:
        """Give back tokens a request was charged for and did not use."""
        bucket = self._buckets.get((tenant.name, "tokens"))
        if bucket is not None and tokens > 0:
            bucket.refill(self.clock())
            bucket.level = min(bucket.capacity, bucket.level + tokens)
