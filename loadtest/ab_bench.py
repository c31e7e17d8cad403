"""A/B over HTTP: loradock servers that differ only in environment variables or flags, loaded in interleaved rounds.

    python -m loradock.loadtest.ab_bench --variant helper: --variant no-helper:LORADOCK_CPU_LORA_HELPER=off \\
        --adapters 8 --rounds 8 [--model DIR|NAME] [--serve-arg=--max-num-seqs=32 ...]

Every variant's server runs at once (an idle server costs ~1% of a core); each round loads every variant in turn, the
order rotating from round to round, so a slow stretch of a shared machine hits each variant alike. The load is
`loradock loadtest`'s: `--requests` at `--concurrency`, prompts of `--prompt-len` random token ids, `--max-tokens`
new tokens each (greedy, streamed), request i naming adapter i mod `--adapters` (`--adapters 0`: the base model), new
prompts each round (the same for every variant: a server's prefix cache never finds an earlier round's). Per variant:
output tokens/s, TTFT p50, and the server's CPU seconds per 1000 output tokens (and the kernel's part of them: page
faults, fresh memory zeroed), per round; then the medians, and each variant's tokens/s over the first's in the same
round (the paired ratio: a machine whose speed drifts during the run moves both sides of it alike), their median and
range. A variant is `NAME:` (no change), `NAME:VAR=VALUE,VAR=VALUE`, with `--variant-args NAME=--flag=value,...`
adding `loradock serve` flags to one variant, and `--dora-variant NAME` giving it DoRA adapters (the same rank,
targets and seeds, plus magnitude vectors) instead of plain ones. DoRA's cost:

    python -m loradock.loadtest.ab_bench --variant plain: --variant dora: --dora-variant dora --adapters 8 --rank 16

(goal: dora's tokens/s at least 0.9 of plain's, the paired ratio's median).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import loadtest as lt
from .hardware import describe_hardware, format_hardware
from .peer_bench import CpuWatch, Server, free_port, load_spec, wait_for_quiet

BASE = "base"


@dataclass
class Variant:
    name: str
    env: dict[str, str]
    serve_args: list[str] = field(default_factory=list)
    dora: bool = False  # its adapters are DoRA
    rounds: list[dict] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.rounds)


def parse_variant(text: str) -> Variant:
    name, _, assignments = text.partition(":")
    env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return Variant(name, env)


def server_for(variant: Variant, args, model: Path, adapter_dir: Path | None, work: Path) -> Server:
    argv = [sys.executable, "-m", "loradock", "serve", "--model", str(model), "--port", str(free_port()),
            "--served-model-name", BASE, "--max-model-len", str(args.prompt_len[1] + args.max_tokens + 16)]
    if adapter_dir is not None:
        argv += ["--adapters", str(adapter_dir), "--max-gpu-adapters", str(args.adapters), "--max-lora-rank",
                 str(args.rank)]
    port = int(argv[argv.index("--port") + 1])
    return Server(variant.name, argv + args.serve_arg + variant.serve_args, port, variant.env, work, Path.cwd(),
                  startup_timeout=300)


def run_round(variant: Variant, server: Server, servers: list[Server], spec: lt.LoadSpec, args) -> dict:
    wait_for_quiet(servers, args.quiet_wait)
    with CpuWatch([server]) as watch:
        result = asyncio.run(lt.run_load(spec))
    report = result.report()
    tokens = report["output_tokens_per_s"] * report["duration_s"]
    row = {
        "output_tokens_per_s": report["output_tokens_per_s"],
        "ttft_p50_ms": report["latency_ms"]["ttft"]["p50"],
        "server_cpu_s_per_1k_tokens": 1000 * watch.cores["servers"] * report["duration_s"] / max(tokens, 1),
        "server_kernel_s_per_1k_tokens": 1000 * watch.cores["servers_kernel"] * report["duration_s"] / max(tokens, 1),
        "server_cores": watch.cores["servers"],
        "others_cores": watch.cores["others"],
        "errors": report["requests"] - report["ok"],
    }
    variant.rounds.append(row)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.ab_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--variant", action="append", type=parse_variant, required=True, help="NAME:VAR=VALUE,...")
    parser.add_argument("--variant-args", action="append", default=[], metavar="NAME=--flag=value,...",
                        help="loradock serve flags for one variant")
    parser.add_argument("--dora-variant", action="append", default=[], metavar="NAME",
                        help="this variant's adapters are DoRA (the same rank, targets and seeds)")
    parser.add_argument("--serve-arg", action="append", default=[], help="a loradock serve flag for every variant")
    parser.add_argument("--model", help="local HF model dir or built-in name (default: the default model)")
    parser.add_argument("--adapters", type=int, default=8, help="distinct rank-`--rank` adapters, round robin")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-len", type=lt._range, default=(16, 64))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet-wait", type=float, default=5.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "loradock-ab-bench"))
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    for item in args.variant_args:
        name, _, flags = item.partition("=")
        next(v for v in args.variant if v.name == name).serve_args += [f for f in flags.split(",") if f]
    for name in args.dora_variant:
        next(v for v in args.variant if v.name == name).dora = True

    from ..serve.models.source import resolve_model_path
    from .random_adapters import write_bench_adapters

    model = resolve_model_path(args.model)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    adapter_dirs: dict[bool, Path | None] = {False: None, True: None}  # by DoRA or not
    for dora in {variant.dora for variant in args.variant} if args.adapters else ():
        adapter_dirs[dora] = work / f"{model.name}-r{args.rank}{'-dora' if dora else ''}"
        if not all((adapter_dirs[dora] / f"adapter-{i}" / "adapter_model.safetensors").is_file()
                   for i in range(args.adapters)):
            write_bench_adapters(model, adapter_dirs[dora], range(args.adapters), args.rank, dora)
    models = [f"adapter-{i}" for i in range(args.adapters)] or [BASE]
    ordinary = lt.ordinary_token_ids(str(model))
    print(format_hardware(describe_hardware(torch.device("cpu"))), flush=True)
    servers = [server_for(variant, args, model, adapter_dirs[variant.dora], work) for variant in args.variant]
    started: list[Server] = []
    try:
        for server in servers:
            started.append(server.__enter__())
        for round_index in range(args.rounds):
            shift = round_index % len(servers)
            for variant, server in list(zip(args.variant, servers))[shift:] + list(zip(args.variant, servers))[:shift]:
                spec = load_spec(args, server.url, models, "distinct", args.requests, ordinary, warmup=args.concurrency,
                                 seed=args.seed + round_index)  # every variant the same prompts, new each round
                row = run_round(variant, server, servers, spec, args)
                print(f"round {round_index + 1} {variant.name:>12}: {row['output_tokens_per_s']:7.1f} tok/s, TTFT p50 "
                      f"{row['ttft_p50_ms']:7.1f} ms, {row['server_cpu_s_per_1k_tokens']:.2f} server CPU s per 1k "
                      f"tokens ({row['server_kernel_s_per_1k_tokens']:.2f} in the kernel), others "
                      f"{row['others_cores']:.2f} cores", flush=True)
    finally:
        for server in started:
            server.__exit__()
    first = args.variant[0]
    print(f"\nmedians of {args.rounds} interleaved rounds ({model.name}, {args.adapters} adapters, concurrency "
          f"{args.concurrency}, {args.requests} requests x {args.max_tokens} tokens):")
    for variant in args.variant:
        tok = variant.median("output_tokens_per_s")
        ratios = [r["output_tokens_per_s"] / f["output_tokens_per_s"] for r, f in zip(variant.rounds, first.rounds)]
        print(f"  {variant.name:>12}: {tok:7.1f} tok/s; to {first.name}, round by round: median "
              f"{statistics.median(ratios):.3f}, {min(ratios):.2f}-{max(ratios):.2f}; TTFT p50 "
              f"{variant.median('ttft_p50_ms'):.0f} ms, server CPU s per 1k tokens "
              f"{variant.median('server_cpu_s_per_1k_tokens'):.2f} "
              f"({variant.median('server_kernel_s_per_1k_tokens'):.2f} in the kernel)")
    if args.json:
        Path(args.json).write_text(json.dumps({v.name: {"env": v.env, "serve_args": v.serve_args, "dora": v.dora,
                                                         "rounds": v.rounds} for v in args.variant}, indent=1))


if __name__ == "__main__":
    main()
