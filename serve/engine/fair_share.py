"""Virtual token counters (S-LoRA's VTC, "Fairness in Serving Large Language Models", OSDI 2024).

Each client (a tenant, or an adapter without tenants) has a counter of the service it received, weighted:

    counter[c] += (PROMPT_COST · prompt tokens + OUTPUT_COST · output tokens) / weight[c]

Admission serves the client with the smallest counter first. A client with no request in the engine that submits
one has its counter lifted to the smallest counter of the clients that have requests in the engine (or, when none
has, to the counter of the last client that went idle), so time spent idle is not banked as credit. Between two
backlogged clients the difference in service stays bounded (the paper's 2x bound).
"""

from __future__ import annotations

from collections import Counter

PROMPT_COST = 1.0
OUTPUT_COST = 2.0


class FairShare:
    def __init__(self):
        self.counters: dict[str, float] = {}
        self._requests: Counter[str] = Counter()  # requests in the engine (waiting or running) per client
        self._last_idle = 0.0  # the counter of the last client whose last request left

    def arrive(self, client: str) -> None:
        """A request of `client` enters the engine."""
        if not self._requests[client]:
            floor = min((self.counters[c] for c in self._requests if self._requests[c]), default=self._last_idle)
            self.counters[client] = max(self.counters.get(client, 0.0), floor)
        self._requests[client] += 1

    def leave(self, client: str) -> None:
        """A request of `client` finished or was aborted."""
        self._requests[client] -= 1
        if not self._requests[client]:
            del self._requests[client]
            self._last_idle = self.counters[client]

    def charge(self, client: str, cost: float, weight: float) -> None:
        self.counters[client] += cost / weight
