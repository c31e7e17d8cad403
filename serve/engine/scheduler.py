"""Iteration-level scheduling: which requests run in the next step, and how many tokens each.

Every step, running requests go first, oldest first: a decode costs one token of the step's budget, a
prefill runs in chunks of what budget is left. Then waiting requests are admitted while the budget and the KV
cache allow; one whose adapter is not in a device slot yet is passed over. The admission order is the policy
(`admission`): `fcfs`, first come first served, or `fair`, the client (tenant or adapter) with the least weighted
service first (virtual token counters), first come first served within a client; and when every sequence slot is
taken, a client with requests waiting and none running gets a slot from the client running the most (whose request
is paused: it keeps its KV blocks unless the cache runs dry before it runs again). On a backlogged server such a
client's prefill runs in a step of its own, so its first token does not wait for the decodes of those being served.
KV blocks are taken as tokens need them; when the cache runs dry, paused requests give theirs up first, then the
newest running request is preempted (its blocks freed, its tokens recomputed later) so older ones finish. A request
admitted without blocks (new, or preempted) first takes the full blocks of its leading tokens that are cached
(`prefix_cache`), and computes only the rest; the blocks a step fills become findable.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Literal

from .admission import POLICIES
from .kv_cache import PagedKVCache
from .prefix_cache import PrefixCache
from .request import Request


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_batch_tokens: int, max_num_seqs: int,
                 policy: Literal["fcfs", "fair"] = "fcfs", prefix_caching: bool = True):
        self.cache = cache
        self.prefix = PrefixCache(cache, prefix_caching)
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.policy = POLICIES[policy]()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        # Blocks left free when admitting new work, so running requests can grow a little before preemption.
        self.watermark_blocks = max(1, cache.num_blocks // 100)
        self.num_preemptions = 0
        self._stepped_alone = False  # the previous step ran a starved request's prefill alone

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self.policy.arrive(request)

    def remove(self, request: Request) -> None:
        """Drop a finished or aborted request and free its KV blocks at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        else:
            return
        self._release(request)
        self.policy.leave(request)

    def advance(self, entries: list[tuple[Request, int]]) -> None:
        """A step ran `entries`: `n` more tokens of each request are in the cache, and the blocks they filled are
        findable."""
        for request, n in entries:
            request.num_computed += n
            self.prefix.publish(request, request.num_computed - n)

    def schedule(self) -> list[tuple[Request, int]]:
        """The next step: (request, number of its pending tokens to run)."""
        alone = [] if self._stepped_alone else self._step_alone()
        self._stepped_alone = bool(alone)
        return alone or self._step_together()

    def _step_alone(self) -> list[tuple[Request, int]]:
        """The first prefill chunk of the request the policy says is starved, its slot made free (the lender paused);
        [] if none is, or it does not fit.

        It runs alone: beside the running decodes its first token would wait for them too (on the CPU a 16-row decode
        step costs about what a short prefill does). The running streams lose one step per starved arrival, and never
        two steps in a row."""
        claim = self.policy.starved(self.waiting, self.running, self.max_num_seqs - len(self.running))
        if claim is None:
            return []
        if claim.lender is not None:
            self._pause(claim.lender)
        return self._admit([claim.request], self.max_batch_tokens)

    def _step_together(self) -> list[tuple[Request, int]]:
        """Running requests, oldest first, then admissions in the policy's order, within the token budget."""
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
            self.policy.charge(request, n)
            budget -= n
        return entries + self._admit(self.policy.order(self.waiting, self.running), budget)

    def _admit(self, candidates: Iterable[Request], budget: int) -> list[tuple[Request, int]]:
        """Move waiting requests, in the order given, to running while the step's token budget, the sequence slots
        and the KV cache allow; the entries of their first prefill chunks (after the tokens found cached)."""
        entries: list[tuple[Request, int]] = []
        for request in candidates:
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if request.adapter_slot is None:
                continue  # its adapter is not in a device slot yet: let others pass
            cached = [] if request.blocks else self.prefix.find(request)
            computed = request.num_computed + len(cached) * self.cache.block_size
            n = min(request.num_tokens - computed, budget)
            reserve = self.watermark_blocks if self.running else 0
            allocator = self.cache.allocator
            while ((needed := self._blocks_taken(request, cached, computed + n)) + reserve > allocator.num_free
                   and self._drop_paused_blocks(keep=request)):
                pass
            if needed + reserve > allocator.num_free:
                break  # wait for running requests to free blocks
            if not request.blocks:
                self.prefix.take(request, cached)
            request.blocks += allocator.allocate(self.cache.blocks_to_grow(request.blocks, computed + n))
            self.waiting.remove(request)
            self.running.append(request)
            entries.append((request, n))
            self.policy.charge(request, n)
            budget -= n
        return entries

    def _blocks_taken(self, request: Request, cached: list[int], num_tokens: int) -> int:
        """Free blocks that admitting `request` for `num_tokens` tokens takes: the blocks to add, and the `cached`
        blocks found for it that nobody holds."""
        return self.cache.blocks_to_grow(request.blocks + cached, num_tokens) + self.cache.allocator.num_idle(cached)

    def _grow_or_preempt(self, request: Request, num_tokens: int) -> bool:
        """Give `request` blocks for `num_tokens`, preempting newer requests if needed. False if it was preempted."""
        needed = self.cache.blocks_to_grow(request.blocks, num_tokens)
        while needed > self.cache.allocator.num_free:
            if self._drop_paused_blocks():
                continue
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        request.blocks += self.cache.allocator.allocate(needed)
        return True

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
