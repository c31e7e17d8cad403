"""Soak: a `loradock serve` with tenants under steady load for N minutes, then a check that it came back to idle.

    python -m loradock.loadtest.soak --minutes 10 --json soak.json [--model DIR|NAME]

The server runs on 127.0.0.1 (started here, stopped at the end) with `--adapters-count` random adapters, fewer
device slots than adapters, and a tenants file of four tenants. For `--warmup` seconds and then `--minutes`,
`--concurrency` requests (64) stay in flight (`loradock loadtest`'s load: prompts of 16-64 random token ids,
answers of 8-64 tokens, streamed):

- steady (3/8 of them): the base model and two adapters;
- heavy (3/8, weight 2): two adapters and the churned one;
- limited (at most 1/8, one request a second on average): the base model, over its 30 requests a minute: 429s
  are expected;
- hang-up (1/8): hangs up after two streamed tokens (status hung_up; the server must cancel the request).

Meanwhile the admin API unloads and loads the churned adapter every second (its requests get 404 while it is
gone; those in flight finish), and the server gets SIGHUP (tenants reloaded) every `--hup-every` seconds.

Printed: requests and errors by status (per tenant too); the server's resident memory (RSS) after the first
`--warmup` seconds of this load (churn and SIGHUPs included: the start figure) and at the end, and every 10 s in
the JSON; the admin calls by status. Checked (exit status 1 if one fails): no 5xx, no request lost (timeouts,
connection or stream errors) beyond the hung-up ones, no status a tenant should not meet, RSS growth under
`--max-rss-drift`, and, once the load stops, nothing in flight, running or waiting, no KV block and no adapter pin
held.
Bounded: the run stops sending after the warm-up and `--minutes` and has a hard time limit; only 127.0.0.1 is ever
contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import yaml

from . import loadtest as lt
from .peer_bench import Server, free_port

BASE = "base"
TENANT_SHARES = {"steady": 3 / 8, "heavy": 3 / 8, "limited": 1 / 8, "hang-up": 1 / 8}
EXPECTED = {"steady": set(), "heavy": {"404"}, "limited": {"429"}, "hang-up": {"hung_up"}}  # statuses that are no fault
LOST = {"timeout", "connection_error", "stream_error", "bad_response"}


def write_setup(work: Path, model: Path, adapters: int, rank: int) -> tuple[Path, Path, str]:
    """Adapters adapter-0 .. adapter-{n-1} (the last one is churned) and the tenants file; (adapter dir, tenants
    file, churned adapter's name)."""
    from ..serve.api.tenants import hash_key
    from .random_adapters import write_bench_adapters

    adapter_dir = work / f"{model.name}-r{rank}"
    missing = [i for i in range(adapters) if not (adapter_dir / f"adapter-{i}" / "adapter_model.safetensors").is_file()]
    write_bench_adapters(model, adapter_dir, missing, rank)
    churned = f"adapter-{adapters - 1}"
    names = [f"adapter-{i}" for i in range(adapters - 1)]
    tenants = {
        "steady": {"base_model": True, "adapters": names[:2]},
        "heavy": {"adapters": [*names[2:4], churned], "weight": 2},
        "limited": {"base_model": True, "requests_per_minute": 30},
        "hang-up": {"base_model": True, "adapters": names[:1]},
    }
    for name, entry in tenants.items():
        entry["keys"] = [hash_key(f"{name}-key")]
    tenants_file = work / "tenants.yaml"
    tenants_file.write_text(yaml.safe_dump({"tenants": tenants}))
    return adapter_dir, tenants_file, churned


def load_specs(url: str, models: dict[str, list[str]], concurrency: int, duration: float, ordinary: list[int],
               seed: int) -> list[lt.LoadSpec]:
    """The main load (steady, heavy, limited: one spec, a stream each, on the models each tenant lists) and the
    hang-up tenant's (options of its own); both stop sending after `duration` s."""
    share = {name: max(1, round(concurrency * part)) for name, part in TENANT_SHARES.items()}

    def tenant(name: str, rate: float | None = None) -> lt.TenantLoad:
        return lt.TenantLoad(name, f"{name}-key", concurrency=share[name], rate=rate, models=models[name])

    common = {"url": url, "models": [BASE], "duration": duration, "prompt_len": (16, 64), "ordinary_ids": ordinary,
              "output_len": (8, 64), "time_limit": duration + 300}
    main = lt.LoadSpec(**common, seed=seed, tenants=[tenant("steady"), tenant("heavy"), tenant("limited", rate=1.0)],
                       options=lt.RequestOptions(max_tokens=64, timeout=120))
    hang_up = lt.LoadSpec(**common, seed=seed + 100, tenants=[tenant("hang-up")],
                          options=lt.RequestOptions(max_tokens=64, timeout=120, hang_up_after=2))
    return [main, hang_up]


async def churn(url: str, admin: dict, name: str, until: float) -> Counter:
    """Unload and load `name` through the admin API, one call a second, until `until`; statuses by call."""
    statuses: Counter = Counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        loaded = True
        while time.monotonic() < until:
            if loaded:
                call = session.delete(f"{url}/v1/adapters/{name}", headers=admin)
            else:
                call = session.post(f"{url}/v1/adapters", json={"name": name}, headers=admin)
            async with call as response:
                statuses[f"{'unload' if loaded else 'load'} {response.status}"] += 1
                if response.status < 300:
                    loaded = not loaded
            await asyncio.sleep(1.0)
    return statuses


async def hang_ups_and_rss(pid: int, every: float, until: float, samples: list[tuple[float, int]]) -> int:
    """SIGHUP every `every` s and an RSS sample every 10 s (and at `until`), until `until`; SIGHUPs sent."""
    sent, started, last_hup = 0, time.monotonic(), time.monotonic()
    while time.monotonic() < until:
        await asyncio.sleep(min(10.0, max(until - time.monotonic(), 0.0)))
        samples.append((time.monotonic() - started, rss_bytes(pid)))
        if time.monotonic() - last_hup >= every:
            os.kill(pid, signal.SIGHUP)
            sent, last_hup = sent + 1, time.monotonic()
    return sent


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def soak(args, server: Server, churned: str, ordinary: list[int]) -> dict:
    admin = {"Authorization": f"Bearer {server.env['LORADOCK_ADMIN_TOKEN']}"}
    pid = server.process.pid
    rss_launch = rss_bytes(pid)
    models = {name: await lt.served_models(server.url, f"{name}-key") for name in TENANT_SHARES}
    duration = args.warmup + args.minutes * 60
    until = time.monotonic() + duration
    samples: list[tuple[float, int]] = []
    specs = load_specs(server.url, models, args.concurrency, duration, ordinary, args.seed)
    *results, admin_calls, hups = await asyncio.gather(*(lt.run_load(spec) for spec in specs),
                                                       churn(server.url, admin, churned, until),
                                                       hang_ups_and_rss(pid, args.hup_every, until, samples))
    idle = await wait_idle(server, admin, args.idle_timeout)
    rss_start = next(rss for t, rss in samples if t >= args.warmup)
    rss_end = rss_bytes(pid)
    records = [r for result in results for r in result.records]
    reports = [result.report() for result in results]
    return {
        "minutes": args.minutes, "concurrency": args.concurrency, "requests": len(records),
        "errors_by_status": dict(sorted(Counter(r.status for r in records if not r.ok).items())),
        "per_tenant": {name: t for report in reports for name, t in report["per_tenant"].items()},
        "output_tokens_per_s": sum(r["output_tokens_per_s"] for r in reports),
        "rss_bytes": {"after_launch": rss_launch, "start": rss_start, "end": rss_end, "every_10s": samples},
        "rss_drift": (rss_end - rss_start) / rss_start,
        "admin_calls": dict(sorted(admin_calls.items())), "sighups": hups, "idle": idle,
    }


async def wait_idle(server: Server, admin: dict, timeout: float) -> dict:
    """Poll until nothing is in flight, running or waiting, no KV block and no adapter pin is held (or `timeout`);
    what was seen last."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        while True:
            async with session.get(server.url + "/health") as response:
                in_flight = (await response.json())["in_flight"]
            async with session.get(server.url + "/v1/adapters", headers=admin) as response:
                pins = sum(a["in_flight"] for a in (await response.json())["data"])
            metrics = await asyncio.to_thread(server.metrics)
            seen = {"in_flight": in_flight, "adapter_pins": pins,
                    "running": metrics["loradock_running_requests"], "waiting": metrics["loradock_queue_depth"],
                    "kv_cache_usage": metrics["loradock_kv_cache_usage_ratio"],
                    "adapter_slots_used": metrics["loradock_adapter_slots_used"],
                    "adapter_slots_total": metrics["loradock_adapter_slots_total"]}
            quiet = not (in_flight or pins or seen["running"] or seen["waiting"] or seen["kv_cache_usage"])
            if quiet or time.monotonic() > deadline:
                return seen | {"idle": quiet}
            await asyncio.sleep(0.5)


def verdict(result: dict, max_drift: float) -> list[str]:
    """What failed (empty: the soak passed)."""
    failures = []
    errors = result["errors_by_status"]
    server_errors = {s: n for s, n in errors.items() if s.isdigit() and int(s) >= 500}
    if server_errors:
        failures.append(f"5xx answers: {server_errors}")
    lost = {s: n for s, n in errors.items() if s in LOST}
    if lost:
        failures.append(f"requests lost: {lost}")
    unexpected = {name: t["errors_by_status"] for name, t in result["per_tenant"].items()
                  if set(t["errors_by_status"]) - EXPECTED[name]}
    if unexpected:
        failures.append(f"unexpected statuses: {unexpected}")
    if result["rss_drift"] >= max_drift:
        failures.append(f"RSS drift {result['rss_drift']:+.1%} (limit {max_drift:.0%})")
    if not result["idle"]["idle"]:
        failures.append(f"not idle after the load: {result['idle']}")
    return failures


def format_result(result: dict) -> str:
    mib = 2**20
    rss = result["rss_bytes"]
    lines = [f"soak: {result['minutes']:g} min (after the warm-up) at concurrency {result['concurrency']}: "
             f"{result['requests']} requests, "
             f"{result['output_tokens_per_s']:.0f} output tokens/s; errors by status {result['errors_by_status']}"]
    for name, t in result["per_tenant"].items():
        lines.append(f"  {name:<8} {t['ok']}/{t['requests']} ok, errors {t['errors_by_status']}, TTFT p50 "
                     f"{t['ttft_ms'].get('p50', float('nan')):.0f} ms")
    lines += [f"RSS: {rss['after_launch'] / mib:.0f} MiB after launch, {rss['start'] / mib:.0f} MiB after the warm-up, "
              f"{rss['end'] / mib:.0f} MiB at the end, idle (drift {result['rss_drift']:+.2%})",
              f"admin calls: {result['admin_calls']}; SIGHUPs: {result['sighups']}",
              f"after the load: {result['idle']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--model", default="tiny-random", help="local HF model dir or built-in name (default "
                        "tiny-random: the most requests per minute)")
    parser.add_argument("--adapters-count", type=int, default=5, help="random adapters; the last one is churned")
    parser.add_argument("--slots", type=int, default=4, help="device adapter slots (fewer than adapters)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds of the same load before --minutes begin and the start RSS is taken")
    parser.add_argument("--hup-every", type=float, default=30.0, help="seconds between SIGHUPs")
    parser.add_argument("--idle-timeout", type=float, default=60.0, help="seconds to wait for idle after the load")
    parser.add_argument("--max-rss-drift", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "loradock-soak"))
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.adapters_count < 5 or not 1 <= args.slots < args.adapters_count:
        parser.error("--adapters-count must be at least 5 and --slots between 1 and adapters - 1")

    from ..serve.models.source import resolve_model_path

    model = resolve_model_path(args.model)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    adapter_dir, tenants_file, churned = write_setup(work, model, args.adapters_count, args.rank)
    port = free_port()
    argv_serve = [sys.executable, "-m", "loradock", "serve", "--model", str(model), "--port", str(port),
                  "--served-model-name", BASE, "--max-model-len", "160", "--adapters", str(adapter_dir),
                  "--max-gpu-adapters", str(args.slots), "--max-lora-rank", str(args.rank), "--tenants",
                  str(tenants_file)]
    server = Server("soak-server", argv_serve, port, {"LORADOCK_ADMIN_TOKEN": secrets.token_hex(16)}, work, Path.cwd())
    with server:
        ordinary = lt.ordinary_token_ids(str(model))
        result = asyncio.run(soak(args, server, churned, ordinary))
    failures = verdict(result, args.max_rss_drift)
    print(format_result(result))
    print("PASSED" if not failures else "FAILED: " + "; ".join(failures))
    if args.json:
        Path(args.json).write_text(json.dumps(result | {"failures": failures}, indent=1))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
