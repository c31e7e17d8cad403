"""Fair scheduling against first come first served: one `loradock serve --scheduling fcfs` and one `--scheduling
fair`, both up at once with the same tenants file, loaded in interleaved rounds (the order rotating).

    python -m loradock.loadtest.fair_bench --rounds 4 --duration 30 --json fair.json [--model DIR|NAME]

Each round, on each server (`loradock loadtest`'s own load, all on the base model, prompts of `--prompt-len`
random token ids, answers of `--output-len` tokens, greedy, streamed; answers of one fixed length would all end
in the same step, and the flood's slots would then free in waves):

- **alone**: the light tenant sends `--light-requests` requests one at a time on the idle server: its TTFT alone
  (its answers are `--light-output-len` tokens, short, so that a run under the flood holds a dozen of them);
- **flood**: the flood tenant keeps `--flood-concurrency` (48) requests in flight while the light one sends one at a
  time, each the moment its last answer ends, for `--duration` s: the light tenant's TTFT (p50, and over its alone
  figure), and the output tokens/s of both that came within the `--duration` s (not counting the drain after it,
  whose length the policy changes);
- **flood, light thinking**: the same, but the light tenant pauses a random time of mean `--light-think` s between
  its requests. Sent back to back, its requests land just after an engine step has begun (its last answer ended
  at a step's end), so each waits for a whole step of the flood; after a pause they land anywhere in one;
- **pair**: tenants a and b, equal weights, both backlogged (a at `--flood-concurrency`, b at a third of it), for
  `--duration` s: each one's service while both were sending (prompt tokens of requests whose first token came
  in the window + 2 x output tokens that came in it), and a's over b's.

The servers run `--max-num-seqs` (16) requests at once, so the 48 of the flood queue: without a queue every
request is admitted at once and the admission order (what fcfs and fair change) does not matter.
Targets (issue 19): fair keeps the light tenant's TTFT p50 within 2x of alone, total throughput (of both flood runs)
at least 0.95 of fcfs's (paired per round), and a's service within 0.8-1.25x of b's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from . import loadtest as lt
from .hardware import describe_hardware, format_hardware
from .peer_bench import Server, free_port, wait_for_quiet

BASE = "base"
POLICIES = ("fcfs", "fair")
TENANTS = ("light", "flood", "a", "b")


def write_tenants(path: Path) -> None:
    from ..serve.api.tenants import hash_key

    tenants = {name: {"keys": [hash_key(f"{name}-key")], "base_model": True} for name in TENANTS}
    path.write_text(yaml.safe_dump({"tenants": tenants}))


def tenant(name: str, concurrency: int) -> lt.TenantLoad:
    return lt.TenantLoad(name, f"{name}-key", concurrency=concurrency, models=[BASE])


def server_for(policy: str, args, model: Path, tenants_file: Path, work: Path) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "loradock", "serve", "--model", str(model), "--port", str(port),
            "--served-model-name", BASE, "--max-model-len", str(args.prompt_len[1] + max(args.output_len[1], args.light_output_len[1]) + 16),
            "--max-gpu-adapters", "0", "--max-num-seqs", str(args.max_num_seqs), "--tenants", str(tenants_file),
            "--scheduling", policy, "--max-queue", "4096", *args.serve_arg]
    return Server(policy, argv, port, None, work, Path.cwd(), startup_timeout=300)


def spec(args, url: str, ordinary: list[int], tenants: list[lt.TenantLoad], requests: int | None = None,
         duration: float | None = None) -> lt.LoadSpec:
    options = lt.RequestOptions(max_tokens=args.output_len[1], stream=True, timeout=600.0)
    return lt.LoadSpec(url=url, models=[BASE], requests=requests, duration=duration, prompt_len=args.prompt_len,
                       seed=args.seed, options=options, ordinary_ids=ordinary, time_limit=900.0, tenants=tenants,
                       output_len=args.output_len)


def tokens_in_window(result: lt.RunResult, window: float) -> int:
    """Output tokens (one per streamed chunk) that came within `window` s of the start."""
    return sum(1 for r in result.records for t in r.token_times if t <= window)


def windowed_service(result: lt.RunResult, name: str, window: float) -> float:
    """Prompt tokens of the tenant's requests whose first token came within `window` s, plus 2 x the output tokens
    that came within it (one per streamed chunk)."""
    service = 0.0
    for r in result.records:
        if r.tenant != name or r.ttft is None or r.start + r.ttft > window:
            continue
        service += r.prompt_len + 2 * sum(1 for t in r.token_times if t <= window)
    return service


def run_round(args, server: Server, ordinary: list[int]) -> dict:
    light = replace(tenant("light", 1), output_len=args.light_output_len)
    alone = asyncio.run(lt.run_load(spec(args, server.url, ordinary, [light], requests=args.light_requests))).report()
    floods = [asyncio.run(lt.run_load(spec(args, server.url, ordinary, [tenant("flood", args.flood_concurrency),
                                                                        replace(light, think=think)],
                                           duration=args.duration)))
              for think in (None, args.light_think)]
    pair = asyncio.run(lt.run_load(spec(args, server.url, ordinary, [tenant("a", args.flood_concurrency),
                                                                     tenant("b", max(1, args.flood_concurrency // 3))],
                                        duration=args.duration)))
    flood_reports = [flood.report() for flood in floods]
    back_to_back, thinking = (report["per_tenant"]["light"] for report in flood_reports)
    alone_ttft = alone["latency_ms"]["ttft"]["p50"]
    service_a, service_b = (windowed_service(pair, name, args.duration) for name in ("a", "b"))
    errors = sum(r["requests"] - r["ok"] for r in (alone, *flood_reports, pair.report()))
    return {
        "light_ttft_alone_p50_ms": alone_ttft,
        "light_ttft_flood_p50_ms": back_to_back["ttft_ms"]["p50"],
        "light_ttft_over_alone": back_to_back["ttft_ms"]["p50"] / alone_ttft,
        "light_requests_in_flood": back_to_back["ok"],
        "thinking_light_ttft_flood_p50_ms": thinking["ttft_ms"]["p50"],
        "thinking_light_ttft_over_alone": thinking["ttft_ms"]["p50"] / alone_ttft,
        "thinking_light_requests_in_flood": thinking["ok"],
        # both flood runs: 2 x --duration s of the flood per server per round
        "flood_output_tokens_per_s": sum(tokens_in_window(f, args.duration) for f in floods) / (2 * args.duration),
        "pair_service_a": service_a,
        "pair_service_b": service_b,
        "pair_a_over_b": service_a / service_b if service_b else float("inf"),
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.fair_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="local HF model dir or built-in name (default: the default model)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of sending per flood and pair run")
    parser.add_argument("--flood-concurrency", type=int, default=48)
    parser.add_argument("--light-requests", type=int, default=16, help="requests of the light tenant alone")
    parser.add_argument("--light-output-len", type=lt._range, default=(8, 24), help="the light tenant's answers")
    parser.add_argument("--light-think", type=float, default=1.0,
                        help="mean seconds the light tenant pauses before each request in the thinking run")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="the servers' running requests at once")
    parser.add_argument("--prompt-len", type=lt._range, default=(16, 64))
    parser.add_argument("--output-len", type=lt._range, default=(32, 96), help="new tokens per answer, MIN:MAX")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-arg", action="append", default=[], help="a loradock serve flag for both servers")
    parser.add_argument("--quiet-wait", type=float, default=5.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "loradock-fair-bench"))
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    from ..serve.models.source import resolve_model_path

    model = resolve_model_path(args.model)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tenants_file = work / "tenants.yaml"
    write_tenants(tenants_file)
    ordinary = lt.ordinary_token_ids(str(model))
    print(format_hardware(describe_hardware(torch.device("cpu"))), flush=True)
    servers = {policy: server_for(policy, args, model, tenants_file, work) for policy in POLICIES}
    rounds: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
    started: list[Server] = []
    try:
        for server in servers.values():
            started.append(server.__enter__())
            asyncio.run(lt.run_load(spec(args, server.url, ordinary, [tenant("flood", 8)], requests=16)))  # warm up
        for index in range(args.rounds):
            order = POLICIES[index % 2:] + POLICIES[: index % 2]
            for policy in order:
                wait_for_quiet(started, args.quiet_wait)
                row = run_round(args, servers[policy], ordinary)
                rounds[policy].append(row)
                print(f"round {index + 1} {policy}: light TTFT p50 alone {row['light_ttft_alone_p50_ms']:.0f} ms, "
                      f"under the flood {row['light_ttft_flood_p50_ms']:.0f} ms ({row['light_ttft_over_alone']:.2f}x, "
                      f"{row['light_requests_in_flood']} requests), thinking "
                      f"{row['thinking_light_ttft_flood_p50_ms']:.0f} ms ({row['thinking_light_ttft_over_alone']:.2f}x, "
                      f"{row['thinking_light_requests_in_flood']}); {row['flood_output_tokens_per_s']:.0f} tok/s; "
                      f"pair a/b {row['pair_a_over_b']:.2f}; errors {row['errors']}", flush=True)
    finally:
        for server in started:
            server.__exit__()
    print(summary(args, model, rounds))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"} | {"model": str(model)}
        Path(args.json).write_text(json.dumps(lt._finite({"settings": settings, "rounds": rounds}), indent=1))
    return 0


def summary(args, model: Path, rounds: dict[str, list[dict]]) -> str:
    def median(policy: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[policy])

    throughput = [fair["flood_output_tokens_per_s"] / fcfs["flood_output_tokens_per_s"]
                  for fair, fcfs in zip(rounds["fair"], rounds["fcfs"])]
    lines = [f"\nmedians of {args.rounds} interleaved rounds ({model.name}, --max-num-seqs {args.max_num_seqs}, flood "
             f"at concurrency {args.flood_concurrency}, {args.output_len[0]}-{args.output_len[1]} new tokens, "
             f"{args.duration:g} s runs):",
             f"{'':6}{'light TTFT alone':>18}{'under flood':>13}{'x alone':>9}{'thinking':>10}{'x alone':>9}"
             + f"{'tok/s':>8}{'pair a/b':>10}"]
    for policy in POLICIES:
        lines.append(f"{policy:<6}{median(policy, 'light_ttft_alone_p50_ms'):>15.0f} ms"
                     f"{median(policy, 'light_ttft_flood_p50_ms'):>10.0f} ms"
                     f"{median(policy, 'light_ttft_over_alone'):>9.2f}"
                     f"{median(policy, 'thinking_light_ttft_flood_p50_ms'):>7.0f} ms"
                     f"{median(policy, 'thinking_light_ttft_over_alone'):>9.2f}"
                     f"{median(policy, 'flood_output_tokens_per_s'):>8.0f}{median(policy, 'pair_a_over_b'):>10.2f}")
    lines.append(f"fair / fcfs throughput, round by round: median {statistics.median(throughput):.3f}, "
                 f"{min(throughput):.3f}-{max(throughput):.3f}")
    fair_ttft, fair_pair = median("fair", "light_ttft_over_alone"), median("fair", "pair_a_over_b")
    thinking_ttft = median("fair", "thinking_light_ttft_over_alone")
    kept = statistics.median(throughput)

    def met(ok: bool) -> str:
        return "met" if ok else "not met"

    lines.append(f"targets: light TTFT within 2x of alone: {fair_ttft:.2f}x back to back ({met(fair_ttft <= 2)}), "
                 f"{thinking_ttft:.2f}x thinking ({met(thinking_ttft <= 2)}); throughput >= "
                 f"0.95 of fcfs: {kept:.3f} ({met(kept >= 0.95)}); pair a/b in 0.8-1.25: {fair_pair:.2f} "
                 f"({met(0.8 <= fair_pair <= 1.25)})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
