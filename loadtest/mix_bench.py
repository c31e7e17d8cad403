"""Mixes of adapters measured: how long a named mix of two adapters takes to build (`POST /v1/adapters` with merge),
the latency of the first request on it, and the same for a mix per request (whose first request builds it).

    python -m loradock.loadtest.mix_bench --json mix.json

Not part of CI (on the default model and 2 cores: about a minute with the default options).

What it runs: two random adapters of `--rank` on every linear module (written by peft, as the other benchmarks'), one
`loradock serve` on `--model` (default: SmolLM2-135M-Instruct) with the two as its adapter directory, each source
asked once so both are in the host cache. Then, for each `--methods` and each of `--repeats` rounds, timed from
this process over HTTP: the named mix's build (the POST's wall time: mixing, writing its PEFT folder, reading it
back through the adapter checks, registering it), then its first and second streamed request (time to the first
token and to the last, `--max-tokens` greedy tokens), then it is unloaded; a mix per request of the same recipe
with a new seed each round (so each round builds it): its first request (the build inside) and its second; and a
request on a source as the reference. The table gives each figure's median over the rounds, with the hardware
named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import torch

from . import peer_bench as pb
from .hardware import describe_hardware, format_hardware
from .random_adapters import write_bench_adapters

TOKEN = "mix-bench"
SOURCES = ("adapter-0", "adapter-1")
DENSITY = {"ties": 0.5, "dare_linear": 0.5, "dare_ties": 0.5}  # the methods that take one


def post(url: str, path: str, body: dict | None, stream: bool = False,
         method: str = "POST") -> tuple[float, float, dict | None]:
    """(seconds to the first streamed event or the reply, seconds to the end, the reply's JSON unless streamed)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data, method=method, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as reply:
        if not stream:
            data = json.loads(reply.read())
            elapsed = time.perf_counter() - started
            return elapsed, elapsed, data
        first = None
        for line in reply:
            if line.startswith(b"data: ") and first is None:
                first = time.perf_counter() - started
        return first, time.perf_counter() - started, None


def generate(url: str, max_tokens: int, **body) -> tuple[float, float]:
    """(TTFT, end-to-end) of one streamed greedy completion."""
    first, total, _ = post(url, "/v1/completions", {"model": pb.BASE, "prompt": "Write a short note about the sea.",
                                                   "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                                                   "stream": True, **body}, stream=True)
    return first, total


def recipe(method: str, seed: int) -> dict:
    adapters = [{"name": SOURCES[0], "weight": 0.7}, {"name": SOURCES[1], "weight": 0.3}]
    return {"adapters": adapters, "method": method, "density": DENSITY.get(method), "seed": seed}


def round_of(url: str, method: str, index: int, max_tokens: int) -> dict[str, float]:
    """One round's figures for `method` (seconds)."""
    name = f"mix-{method}-{index}"
    build, _, _ = post(url, "/v1/adapters", {"name": name, "merge": recipe(method, index)})
    named_first, named_second = (generate(url, max_tokens, model=name) for _ in range(2))
    mix = recipe(method, 1000 + index)
    per_request = {"adapters": mix["adapters"], "merge_method": method, "merge_seed": mix["seed"],
                   **({"density": mix["density"]} if mix["density"] is not None else {})}
    request_first, request_second = (generate(url, max_tokens, **per_request) for _ in range(2))
    source = generate(url, max_tokens, model=SOURCES[0])
    post(url, f"/v1/adapters/{name}", None, method="DELETE")  # its folder under the cache goes with it
    return {"build_s": build, "named_first_ttft_s": named_first[0], "named_first_e2e_s": named_first[1],
            "named_second_ttft_s": named_second[0], "named_second_e2e_s": named_second[1],
            "request_first_ttft_s": request_first[0], "request_first_e2e_s": request_first[1],
            "request_second_ttft_s": request_second[0], "request_second_e2e_s": request_second[1],
            "source_ttft_s": source[0], "source_e2e_s": source[1]}


def format_table(rows: dict[str, list[dict]]) -> str:
    columns = [("build_s", "named: build"), ("named_first_ttft_s", "1st TTFT"), ("named_first_e2e_s", "1st e2e"),
               ("named_second_ttft_s", "2nd TTFT"), ("request_first_ttft_s", "per request: 1st TTFT"),
               ("request_first_e2e_s", "1st e2e"), ("request_second_ttft_s", "2nd TTFT"),
               ("source_ttft_s", "a source: TTFT")]
    lines = ["| method | " + " | ".join(label for _, label in columns) + " |",
             "| --- |" + " ---: |" * len(columns)]
    for method, measured in rows.items():
        cells = [f"{statistics.median(r[key] for r in measured) * 1000:.0f} ms" for key, _ in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.mix_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="local HF model directory or built-in name (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--rank", type=int, default=16, help="the two source adapters' rank, on every linear")
    parser.add_argument("--methods", default="linear,cat,svd,dare_ties", help="comma-separated merge methods")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per method")
    parser.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per timed request")
    parser.add_argument("--work-dir", default="/tmp/loradock-mix-bench", help="adapters and the server's log")
    parser.add_argument("--json", help="write the figures here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from ..serve.models.source import resolve_model_path, served_model_name

    args = parse_args(argv)
    hardware = describe_hardware(torch.device("cpu"))
    print(format_hardware(hardware), flush=True)
    model, work = resolve_model_path(args.model), Path(args.work_dir)
    adapter_dir = work / f"adapters-{served_model_name(args.model)}-r{args.rank}"
    write_bench_adapters(model, adapter_dir, range(len(SOURCES)), args.rank)
    port = pb.free_port()
    argv = [sys.executable, "-m", "loradock", "serve", "--model", str(model), "--port", str(port),
            "--served-model-name", pb.BASE, "--adapters", str(adapter_dir), "--max-lora-rank", str(2 * args.rank),
            "--admin-token", TOKEN]
    rows: dict[str, list[dict]] = {}
    with pb.Server("loradock-mix", argv, port, None, work, work, startup_timeout=180) as server:
        for source in SOURCES:  # both sources read into the host cache: a build reads no file
            generate(server.url, 1, model=source)
        for method in args.methods.split(","):
            rows[method] = [round_of(server.url, method, i, args.max_tokens) for i in range(args.repeats)]
    table = format_table(rows)
    print(f"two rank-{args.rank} all-linear adapters on {served_model_name(args.model)}, {args.max_tokens} tokens "
          f"per request; medians of {args.repeats} rounds\n{table}")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hardware, "rank": args.rank, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
