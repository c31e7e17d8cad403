"""Fair admission (virtual token counters): the order on a scripted arrival sequence, weighted shares between
backlogged clients, and no starvation through the running engine with three clients.

The first two tests drive the scheduler alone, step by step (no model: well under a second); the last runs the tiny
llama twice, fcfs and fair (about 2 s).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from support import start_engine

from loradock.serve.engine import SamplingParams
from loradock.serve.engine.kv_cache import CacheShape, PagedKVCache
from loradock.serve.engine.request import Request
from loradock.serve.engine.scheduler import Scheduler

SHAPE = CacheShape(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32)


def make_request(name: str, client: str, prompt_len: int = 4, weight: float = 1.0) -> Request:
    return Request(request_id=name, prompt_ids=[1] * prompt_len, params=SamplingParams(), generator=None,
                   client=client, weight=weight)


class Simulation:
    """The engine's loop without a model: schedule, count computed tokens, sample a token when due, finish a
    request after `outputs` tokens. Records the order in which requests are admitted."""

    def __init__(self, policy: str, max_num_seqs: int, outputs: int = 2):
        cache = PagedKVCache(SHAPE, num_blocks=4096, block_size=4, device=torch.device("cpu"))
        self.scheduler = Scheduler(cache, max_batch_tokens=256, max_num_seqs=max_num_seqs, policy=policy)
        self.outputs = outputs
        self.admitted: list[str] = []
        self.served: dict[str, float] = {}  # client -> prompt tokens + 2 x output tokens run, weighted
        self.last_step: list[tuple[str, int]] = []  # (request id, tokens run) of the latest step

    def step(self, arrivals: list[Request] = ()) -> None:
        for request in arrivals:
            self.scheduler.add(request)
        before = set(map(id, self.scheduler.running))
        entries = self.scheduler.schedule()
        self.last_step = [(r.request_id, n) for r, n in entries]
        self.admitted += [r.request_id for r, _ in entries if id(r) not in before]
        for request, n in entries:
            fresh_prompt = max(0, min(request.num_computed + n, len(request.prompt_ids)) - request.num_computed)
            request.num_computed += n
            cost = fresh_prompt
            if request.num_computed == request.num_tokens:
                request.output_ids.append(7)
                cost += 2
            self.served[request.client] = self.served.get(request.client, 0.0) + cost / request.weight
            if len(request.output_ids) == self.outputs:
                self.scheduler.remove(request)


def scripted(policy: str) -> list[str]:
    """One slot, requests of 4 prompt tokens + 2 output tokens (cost 8), each running 2 steps. Step 0: a1-a6 and
    b1 arrive; step 5: c1 and c2 (a new client); step 13: b2 and b3 (b idle since step 3)."""
    sim = Simulation(policy, max_num_seqs=1)
    arrivals = {0: [make_request(n, n[0]) for n in ("a1", "a2", "a3", "a4", "a5", "a6", "b1")],
                5: [make_request(n, "c") for n in ("c1", "c2")], 13: [make_request(n, "b") for n in ("b2", "b3")]}
    for t in range(24):
        sim.step(arrivals.get(t, []))
    assert not sim.scheduler.waiting and not sim.scheduler.running
    return sim.admitted


def test_fcfs_admits_in_arrival_order():
    assert scripted("fcfs") == ["a1", "a2", "a3", "a4", "a5", "a6", "b1", "c1", "c2", "b2", "b3"]


def test_fair_admits_the_least_served_client_and_lifts_returning_ones():
    # Counters (prompt 4 charged at admission, 2 per output token as it is sampled):
    #   t0  a=0 b=0, a tie: a1 came first -> a1 (a 8 by t1)      t2  a=8 b=0 -> b1 (b 8; idle from t3)
    #   t4  only a waits -> a2 (a 14)
    #   t5  c arrives new: lifted to the least counter in the engine, a's 14 (not 0: c1 and c2 would run back to back)
    #   t6  c=14 a=16 -> c1 (c 22)   t8  a=16 -> a3 (a 24)   t10  c=22 -> c2 (c 30)   t12  a4 (a 32 by t13)
    #   t13 b returns from idle: its 8 lifted to a's 30 (not banked: b2 and b3 would run back to back)
    #   t14 b=30 a=32 -> b2 (b 38)   t16  a=32 -> a5 (a 40)   t18  b=38 -> b3   t20  a6
    assert scripted("fair") == ["a1", "b1", "a2", "c1", "a3", "c2", "a4", "b2", "a5", "b3", "a6"]


def test_backlogged_clients_share_by_weight_within_the_bound():
    """Two clients that always have requests waiting, weights 2 and 1, four slots: weighted service stays within
    twice the largest request's cost of each other at every step (VTC's bound), so service divides 2 : 1."""
    sim = Simulation("fair", max_num_seqs=4, outputs=8)
    largest = 32 + 2 * 8  # prompt tokens + 2 x output tokens of the longest request
    counts = {"heavy": 0, "light": 0}

    def top_up() -> list[Request]:
        new = []
        for client, weight, prompt_len in (("heavy", 2.0, 32), ("light", 1.0, 8)):
            waiting = sum(r.client == client for r in sim.scheduler.waiting)
            for _ in range(3 - waiting):
                counts[client] += 1
                new.append(make_request(f"{client}{counts[client]}", client, prompt_len, weight))
        return new

    for _ in range(400):
        sim.step(top_up())
        gap = abs(sim.served.get("heavy", 0.0) - sim.served.get("light", 0.0))
        assert gap <= 2 * largest, (sim.served, gap)
    heavy_tokens, light_tokens = 2 * sim.served["heavy"], sim.served["light"]  # unweighted service
    assert 1.8 < heavy_tokens / light_tokens < 2.2


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_a_client_with_nothing_running_gets_a_slot_from_a_flooding_one(policy):
    """Client a fills the four slots with long requests and queues more; b sends one. Fair: b's prompt runs in the
    step it arrives in, alone (its counter lifted to a's: the tie goes to the client with nothing running), a's newest
    is preempted, once, and the next step runs a's three decodes beside b's. FCFS: b waits for all of a's queued
    requests."""
    sim = Simulation(policy, max_num_seqs=4, outputs=40)
    sim.step([make_request(f"a{i}", "a") for i in range(8)])
    for _ in range(3):
        sim.step()
    sim.step([make_request("b1", "b", prompt_len=6)])
    running = [r.request_id for r in sim.scheduler.running]
    if policy == "fair":
        assert running == ["a0", "a1", "a2", "b1"] and sim.scheduler.num_preemptions == 1
        assert sim.last_step == [("b1", 6)]
        sim.step()
        assert sim.last_step == [("a0", 1), ("a1", 1), ("a2", 1), ("b1", 1)]
    else:
        assert running == ["a0", "a1", "a2", "a3"] and sim.scheduler.num_preemptions == 0
        assert [n for _, n in sim.last_step] == [1, 1, 1, 1]
    for _ in range(30):  # a keeps three slots and b one: no more preemptions
        sim.step()
    assert sim.scheduler.num_preemptions == (1 if policy == "fair" else 0)


def test_a_paused_request_resumes_where_it_stopped_unless_the_cache_runs_dry():
    """The request b's slot was taken from keeps its KV blocks while it waits and resumes with one token, not its
    whole context again. With a cache too small for everyone, a paused request gives its blocks up first (and
    recomputes later), and every request still finishes."""
    sim = Simulation("fair", max_num_seqs=4, outputs=6)
    sim.step([make_request(f"a{i}", "a") for i in range(6)])
    sim.step([make_request("b1", "b")])
    paused = next(r for r in sim.scheduler.waiting if r.request_id == "a3")
    assert paused.blocks and paused.num_computed == 4 + 1 - 1  # its prompt and first token, its second pending
    while not any(request_id == "a3" for request_id, _ in sim.last_step):
        sim.step()
    assert ("a3", 1) in sim.last_step

    cache = PagedKVCache(SHAPE, num_blocks=8, block_size=4, device=torch.device("cpu"))  # 32 tokens in all
    sim.scheduler = Scheduler(cache, max_batch_tokens=256, max_num_seqs=3, policy="fair")
    sim.step([make_request(f"c{i}", "c", prompt_len=6) for i in range(5)])
    sim.step()
    sim.step([make_request("d1", "d", prompt_len=6)])  # c2 paused; d1's prompt fits only in c2's blocks
    c2 = next(r for r in sim.scheduler.waiting if r.request_id == "c2")
    assert sim.last_step == [("d1", 6)] and not c2.blocks and c2.num_computed == 0
    assert all(len(r.blocks) == 2 for r in sim.scheduler.running)
    for _ in range(60):
        sim.step()
    assert not sim.scheduler.waiting and not sim.scheduler.running and cache.allocator.num_free == 8


def test_a_starved_prefill_runs_alone_only_on_a_backlogged_server():
    """Four slots. With a slot free and nothing else waiting, b's prompt runs beside a's decodes. Once a's requests
    queue, a newcomer's prompt runs alone in the step it arrives in, whether it takes a free slot or one of a's;
    of two newcomers at once, the first gets such a step after a step of everyone's decodes (never two alone steps in
    a row), and the second waits: every client now runs one request, and none is taken from a client's last slot."""
    sim = Simulation("fair", max_num_seqs=4, outputs=60)
    sim.step([make_request(f"a{i}", "a") for i in range(3)])
    sim.step([make_request("b1", "b", prompt_len=5)])
    assert sim.last_step == [("a0", 1), ("a1", 1), ("a2", 1), ("b1", 5)]
    sim.step([make_request(f"a{i}", "a") for i in range(3, 8)])  # a queues: the server is backlogged
    sim.scheduler.remove(next(r for r in sim.scheduler.running if r.request_id == "a0"))  # a slot comes free
    sim.step([make_request("c1", "c", prompt_len=6)])
    assert sim.last_step == [("c1", 6)]
    sim.step([make_request("d1", "d", prompt_len=7), make_request("e1", "e", prompt_len=8)])
    assert [n for _, n in sim.last_step] == [1, 1, 1, 1]  # no two alone steps in a row: d and e wait a step
    sim.step()
    assert sim.last_step == [("d1", 7)]
    for _ in range(3):
        sim.step()
        assert len(sim.last_step) == 4 and all(n == 1 for _, n in sim.last_step)
    assert sorted(r.client for r in sim.scheduler.running) == ["a", "b", "c", "d"]
    assert sim.scheduler.num_preemptions == 1


def test_backlogged_clients_holding_slots_never_preempt_each_other():
    """Two clients that always have requests waiting, one slot: each waits its turn, nothing is thrown away."""
    sim = Simulation("fair", max_num_seqs=1, outputs=4)
    for step in range(200):
        sim.step([make_request(f"{c}{step}", c) for c in "ab" if sum(r.client == c for r in sim.scheduler.waiting) < 2])
    assert sim.scheduler.num_preemptions == 0 and abs(sim.served["a"] - sim.served["b"]) <= 2 * (4 + 2 * 4)


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_no_starvation_with_three_clients(model_dir, policy):
    """A flood of 24 requests, then two clients with two requests each, two slots. First come first served, the
    two wait for the whole flood; fair, they finish before half of it."""
    engine = start_engine(model_dir("llama"), kv_cache_memory="8MiB", max_num_seqs=2, scheduling=policy)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    finished: list[str] = []

    async def one(client: str, index: int) -> None:
        async for _ in engine.generate([1, 40 + index, 41, 42, 43, 44], params, client=client):
            pass
        finished.append(client)

    async def everyone():
        clients = ["flood"] * 24 + ["b", "c", "b", "c"]
        await asyncio.gather(*(one(client, i) for i, client in enumerate(clients)))

    try:
        asyncio.run(everyone())
    finally:
        engine.shutdown()
    assert len(finished) == 28
    last_light = max(i for i, client in enumerate(finished) if client != "flood")
    floods_before = finished[:last_light].count("flood")
    if policy == "fcfs":
        assert floods_before >= 23
    else:
        assert floods_before < 12
