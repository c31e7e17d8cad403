"""Iteration-level scheduling: which requests run in the next step, and how many tokens each.

Every step, running requests go first, oldest first: a decode costs one token of the step's budget, a
prefill runs in chunks of what budget is left. Then waiting requests are admitted while the budget and the KV
cache allow; one whose adapter is not in a device slot yet is passed over. The admission order is the policy:
`fcfs`, first come first served, or `fair`, the client (tenant or adapter) with the least weighted service first
(virtual token counters, `fair_share`), first come first served within a client; and when every sequence slot is
taken, a client with requests waiting and none running gets a slot from the client running the most (whose request
is paused: it keeps its KV blocks unless the cache runs dry before it runs again). On a backlogged server such a
client's prefill runs in a step of its own, so its first token does not wait for the decodes of those being served.
KV blocks are taken as tokens need them; when the cache runs dry, paused requests give theirs up first, then the
newest running request is preempted (its blocks freed, its tokens recomputed later) so older ones finish.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import Literal

from .fair_share import OUTPUT_COST, PROMPT_COST, FairShare
from .kv_cache import PagedKVCache
from .request import Request


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_batch_tokens: int, max_num_seqs: int,
                 policy: Literal["fcfs", "fair"] = "fcfs"):
        self.cache = cache
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.fair = FairShare() if policy == "fair" else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        # Blocks left free when admitting new work, so running requests can grow a little before preemption.
        self.watermark_blocks = max(1, cache.num_blocks // 100)
        self.num_preemptions = 0
        self._last_step_alone = False  # the last step ran only a starved client's prefill

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        if self.fair is not None:
            self.fair.arrive(request.client)

    def remove(self, request: Request) -> None:
        """Drop a finished or aborted request and free its KV blocks at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        else:
            return
        self._release(request)
        if self.fair is not None:
            self.fair.leave(request.client)

    def schedule(self) -> list[tuple[Request, int]]:
        """The next step: (request, number of its pending tokens to run)."""
        if self.fair is not None and self.running and not self._last_step_alone:
            starved = self._starved()
            # Its prefill runs alone: beside the running decodes its first token would wait for them too (on the CPU
            # a 16-row decode step costs about what a short prefill does). The running streams lose one step per
            # starved arrival, and never two steps in a row.
            entries = self._admit([starved], self.max_batch_tokens) if starved is not None else []
            if entries:
                self._last_step_alone = True
                return entries
        self._last_step_alone = False
        budget = self.max_batch_tokens
        entries: list[tuple[Request, int]] = []
        for request in list(self.running):
            if budget == 0:
                break
            if request not in self.running:  # preempted for an older request in this loop
                continue
            n = min(request.num_pending, budget)
            if not self._grow_or_preempt(request, request.num_computed + n):
                continue
            entries.append((request, n))
            self._charge(request, n)
            budget -= n
        return entries + self._admit(self._admission_order(), budget)

    def _admit(self, candidates: Iterable[Request], budget: int) -> list[tuple[Request, int]]:
        """Move waiting requests, in the order given, to running while the step's token budget, the sequence slots
        and the KV cache allow; the entries of their first prefill chunks."""
        entries: list[tuple[Request, int]] = []
        for request in candidates:
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if request.adapter_slot is None:
                continue  # its adapter is not in a device slot yet: let others pass
            n = min(request.num_pending, budget)
            needed = self.cache.blocks_needed(request.num_computed + n) - len(request.blocks)
            reserve = self.watermark_blocks if self.running else 0
            while needed + reserve > self.cache.allocator.num_free and self._drop_paused_blocks(keep=request):
                pass
            if needed + reserve > self.cache.allocator.num_free:
                break  # wait for running requests to free blocks
            self._grow(request, request.num_computed + n)
            self.waiting.remove(request)
            self.running.append(request)
            entries.append((request, n))
            self._charge(request, n)
            budget -= n
        return entries

    def _admission_order(self) -> Iterator[Request]:
        """Waiting requests in the order to admit them. Fair: the client with the smallest counter next (ties: one
        with nothing running, then the one waiting longest), re-chosen after each admission since admitting charges
        the client's counter."""
        if self.fair is None:
            yield from list(self.waiting)
            return
        queues: dict[str, deque[tuple[int, Request]]] = {}
        for position, request in enumerate(self.waiting):
            if request.adapter_slot is not None:  # one waiting for its adapter would be passed over anyway
                queues.setdefault(request.client, deque()).append((position, request))
        counters, running = self.fair.counters, {request.client for request in self.running}
        while queues:
            client = min(queues, key=lambda c: (counters[c], c in running, queues[c][0][0]))
            yield queues[client].popleft()[1]
            if not queues[client]:
                del queues[client]

    def _starved(self) -> Request | None:
        """The request of a client with requests waiting and none running that is owed a slot now on a backlogged
        server, with the slot made free for it; None if there is none.

        With a slot free: the first request in fair order, if its client runs nothing and more requests wait than
        slots are free (without a backlog every request is admitted at once anyway). With every slot taken: the
        least-served client with nothing running takes a slot from the client running the most, if that one runs two
        or more and has been served as much or more (a tie goes to the client with nothing running, so the paused
        request queues behind it); its newest request is paused. Counters order admission only: without this a
        light client waits until one of a flooding client's requests ends, seconds when outputs are long. Taking
        only from a client that keeps a slot means two backlogged clients never preempt each other back and forth."""
        free = self.max_num_seqs - len(self.running)
        if free > 0 and len(self.waiting) <= free:
            return None  # checked before anything is counted: the common step, with no backlog
        held = Counter(request.client for request in self.running)
        if free > 0:
            first = next(self._admission_order(), None)
            return first if first is not None and first.client not in held else None
        starved = next((r for r in self._admission_order() if r.client not in held), None)
        if starved is None:
            return None
        lender, slots = held.most_common(1)[0]
        counters = self.fair.counters
        if slots < 2 or counters[starved.client] > counters[lender]:
            return None
        self._pause(next(r for r in reversed(self.running) if r.client == lender))
        return starved

    def _charge(self, request: Request, n: int) -> None:
        """Count the service of running `n` tokens of `request` against its client: its prompt at its first
        admission, and one output token when these tokens complete it (the step samples its next token)."""
        if self.fair is None:
            return
        if not request.prompt_charged:
            request.prompt_charged = True
            self.fair.charge(request.client, PROMPT_COST * len(request.prompt_ids), request.weight)
        if request.num_computed + n == request.num_tokens:
            self.fair.charge(request.client, OUTPUT_COST, request.weight)

    def _grow_or_preempt(self, request: Request, num_tokens: int) -> bool:
        """Give `request` blocks for `num_tokens`, preempting newer requests if needed. False if it was preempted."""
        needed = self.cache.blocks_needed(num_tokens) - len(request.blocks)
        while needed > self.cache.allocator.num_free:
            if self._drop_paused_blocks():
                continue
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        self._grow(request, num_tokens)
        return True

    def _grow(self, request: Request, num_tokens: int) -> None:
        needed = self.cache.blocks_needed(num_tokens) - len(request.blocks)
        if needed > 0:
            request.blocks.extend(self.cache.allocator.allocate(needed))

    def _preempt(self, request: Request) -> None:
        """Back to the front of the queue, its KV blocks freed: its tokens are recomputed when it runs again."""
        self._pause(request)
        self._release(request)

    def _pause(self, request: Request) -> None:
        """Back to the front of the queue with its KV blocks kept: it resumes where it stopped, unless the cache runs
        dry before it runs again (`_drop_paused_blocks`)."""
        self.running.remove(request)
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _drop_paused_blocks(self, keep: Request | None = None) -> bool:
        """Free the KV blocks of one paused request (other than `keep`): it will recompute its tokens. False if no
        waiting request holds blocks."""
        paused = next((r for r in self.waiting if r.blocks and r is not keep), None)
        if paused is None:
            return False
        self._release(paused)
        return True

    def _release(self, request: Request) -> None:
        self.cache.allocator.free(request.blocks)
        request.blocks = []
        request.num_computed = 0
