"""Admission policies: the order in which waiting requests are admitted, the service each client is charged, and
which waiting request is owed a slot now. The scheduler asks; it moves, pauses and runs requests itself.

`fcfs`: first come first served, nothing counted, nobody owed a slot.

`fair`: virtual token counters (S-LoRA's VTC, "Fairness in Serving Large Language Models", OSDI 2024). Each client
(a tenant, or an adapter without tenants) has a counter of the service it received, weighted:

    counter[c] += (PROMPT_COST · prompt tokens computed + OUTPUT_COST · output tokens) / weight[c]

(prompt tokens found in the prefix cache are not computed, and not charged).

Admission serves the client with the smallest counter first. A client with no request in the engine that submits
one has its counter lifted to the smallest counter of the clients that have requests in the engine (or, when none
has, to the counter of the last client that went idle), so time spent idle is not banked as credit. Between two
backlogged clients the difference in service stays bounded (the paper's 2x bound). On a backlogged server a client
with requests waiting and none running is owed a slot at once, taken from the client running the most if need be.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from .batch import completes
from .request import Request

PROMPT_COST = 1.0
OUTPUT_COST = 2.0


@dataclass(frozen=True)
class Claim:
    """A waiting request owed a slot now, and the running request whose slot it takes (None: a slot is free)."""

    request: Request
    lender: Request | None


class AdmissionPolicy(Protocol):
    """What the scheduler asks. A policy keeps its own state per client and per request, from `arrive` to `leave`."""

    def arrive(self, request: Request) -> None:
        """`request` entered the engine."""

    def leave(self, request: Request) -> None:
        """`request` finished or was aborted."""

    def order(self, waiting: Sequence[Request], running: Sequence[Request]) -> Iterator[Request]:
        """The waiting requests in the order to admit them; the next one is chosen after the previous was admitted
        and charged."""

    def charge(self, request: Request, n: int) -> None:
        """`n` tokens of `request` run in this step."""

    def starved(self, waiting: Sequence[Request], running: Sequence[Request], free_slots: int) -> Claim | None:
        """The waiting request owed a slot now, ahead of the admission order, and the running request whose slot it
        takes; None if none is owed one. Nothing is moved: the scheduler pauses the lender and admits the request."""


class FirstComeFirstServed:
    """Arrival order; nothing counted, nobody owed a slot."""

    def arrive(self, request: Request) -> None:
        pass

    def leave(self, request: Request) -> None:
        pass

    def order(self, waiting: Sequence[Request], running: Sequence[Request]) -> Iterator[Request]:
        yield from list(waiting)

    def charge(self, request: Request, n: int) -> None:
        pass

    def starved(self, waiting: Sequence[Request], running: Sequence[Request], free_slots: int) -> Claim | None:
        return None


class FairShare:
    """Virtual token counters per client (see above); the requests whose prompt was charged."""

    def __init__(self):
        self.counters: dict[str, float] = {}
        self._requests: Counter[str] = Counter()  # requests in the engine (waiting or running) per client
        self._last_idle = 0.0  # the counter of the last client whose last request left
        self._prompt_charged: set[Request] = set()  # charged once, at its first admission

    def arrive(self, request: Request) -> None:
        """Lift the counter of a client returning from idle to the least counter of the clients in the engine."""
        client = request.client
        if not self._requests[client]:
            floor = min((self.counters[c] for c in self._requests if self._requests[c]), default=self._last_idle)
            self.counters[client] = max(self.counters.get(client, 0.0), floor)
        self._requests[client] += 1

    def leave(self, request: Request) -> None:
        client = request.client
        self._prompt_charged.discard(request)
        self._requests[client] -= 1
        if not self._requests[client]:
            del self._requests[client]
            self._last_idle = self.counters[client]

    def order(self, waiting: Sequence[Request], running: Sequence[Request]) -> Iterator[Request]:
        """The client with the smallest counter next (ties: one with nothing running, then the one waiting longest),
        first come first served within a client. Requests waiting for their adapter are left out."""
        queues: dict[str, deque[tuple[int, Request]]] = {}
        for position, request in enumerate(waiting):
            if request.adapter_slot is not None:  # one waiting for its adapter would be passed over anyway
                queues.setdefault(request.client, deque()).append((position, request))
        serving = {request.client for request in running}
        while queues:
            client = min(queues, key=lambda c: (self.counters[c], c in serving, queues[c][0][0]))
            yield queues[client].popleft()[1]
            if not queues[client]:
                del queues[client]

    def charge(self, request: Request, n: int) -> None:
        """Its prompt tokens not found cached at its first admission, and one output token when these `n` tokens
        complete it (the step samples its next token)."""
        if request not in self._prompt_charged:
            self._prompt_charged.add(request)
            self._charge(request, PROMPT_COST * (len(request.prompt_ids) - request.num_cached_tokens))
        if completes(request, n):
            self._charge(request, OUTPUT_COST)

    def _charge(self, request: Request, cost: float) -> None:
        self.counters[request.client] += cost / request.weight

    def starved(self, waiting: Sequence[Request], running: Sequence[Request], free_slots: int) -> Claim | None:
        """On a backlogged server (requests running, more waiting than slots are free), the request of a client with
        requests waiting and none running that is owed a slot now.

        With a slot free: the first request in fair order, if its client runs nothing. With every slot taken: the
        least-served client with nothing running takes a slot from the client running the most, if that one runs two
        or more and has been served as much or more (a tie goes to the client with nothing running, so the paused
        request queues behind it); the slot is that of its newest request. Counters order admission only: without
        this a light client waits until one of a flooding client's requests ends, seconds when outputs are long.
        Taking only from a client that keeps a slot means two backlogged clients never take slots back and forth."""
        if not running or (free_slots > 0 and len(waiting) <= free_slots):
            return None  # checked before anything is counted: the common step, with no backlog
        held = Counter(request.client for request in running)
        if free_slots > 0:
            first = next(self.order(waiting, running), None)
            return Claim(first, None) if first is not None and first.client not in held else None
        request = next((r for r in self.order(waiting, running) if r.client not in held), None)
        if request is None:
            return None
        lender, slots = held.most_common(1)[0]
        if slots < 2 or self.counters[request.client] > self.counters[lender]:
            return None
        return Claim(request, next(r for r in reversed(running) if r.client == lender))


POLICIES: dict[str, type[AdmissionPolicy]] = {"fcfs": FirstComeFirstServed, "fair": FairShare}
