"""Structured outputs measured: how many answers validate against a schema with and without `response_format`, for
the base model and for an adapter trained on the task; what guiding half of a mixed-adapter batch costs.

    python -m loradock.loadtest.structured_bench --json structured.json

Not part of CI (on the default model and 2 cores: about 35 minutes with the training, 15 without).

What it runs
------------
- The task (`order_extraction`): an order in a sentence -> JSON with a customer, a city, an array of {product,
  quantity} and an enum. `--train` orders train an adapter `orders` with `loradock train` (rank 16 on every linear,
  `--steps` steps of 8 rows); `--test` held-out orders, disjoint from them, are asked of the base model and of the
  adapter, greedy, with and without `response_format: json_schema` (strict), `--max-tokens` each (400: more than the
  longest answer the schema allows). An answer counts as valid when it parses
  as JSON and the `jsonschema` library validates it; as exact when it equals the reference.
- The cost: one `loradock serve` with the `orders` adapter and 7 random adapters of rank 16 (written by peft),
  concurrency 32, chat requests naming the 8 adapters round robin, at most `--load-max-tokens` answer tokens each; in one arm no
  request is guided, in the other every second one asks for the schema. Interleaved rounds (`--repeats`); the table
  gives each arm's output tokens per second per round and the median ratio guided-half / none (goal >= 0.9).
- From the server's /metrics after the runs: the grammar mask's time per step that had guided rows. Before the server
  starts, in this process: each guide of `COMPILED` compiled cold on the model's tokenizer (the first one pays for
  the tokenizer's description, once per engine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import jsonschema
import torch

from . import peer_bench as pb
from .hardware import describe_hardware, format_hardware
from ..serve.engine.grammar import Grammars
from ..serve.engine.guide import Guide
from ..serve.models.source import resolve_model_path
from .order_extraction import SCHEMA, Order, split
from .random_adapters import write_bench_adapters

ADAPTER, BASE = "orders", "base"
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA, "strict": True}}
COMPILED = {
    "tokenizer description + a choice of one": Guide(kind="choice", spec='["yes"]'),
    "the order schema": Guide(kind="json", spec=json.dumps(SCHEMA)),
    "json_object": Guide(kind="json_object"),
    "a choice of three": Guide(kind="choice", spec='["positive", "negative", "neutral"]'),
    "a regex (an ISO date)": Guide(kind="regex", spec=r"\d{4}-\d{2}-\d{2}"),
}


def train_adapter(args, work: Path) -> Path:
    """The `orders` adapter, trained by `loradock train` as a user would (kept in the work dir between runs)."""
    out = work / "adapters" / ADAPTER
    if out.exists():
        return out
    train_rows, _ = split(args.seed, args.train, args.test)
    data = work / "orders-train.jsonl"
    data.write_text("".join(json.dumps(order.row()) + "\n" for order in train_rows))
    argv = [sys.executable, "-m", "loradock", "train", "--data", str(data), "--output", str(out), "--rank", "16",
            "--alpha", "32", "--dropout", "0", "--lr", "2e-3", "--max-steps", str(args.steps), "--batch-size", "8",
            "--max-seq-len", "192", "--val-split", "0.05", "--seed", str(args.seed)]
    if args.model:
        argv += ["--model", args.model]
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    print(f"trained {out} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return out


def verdict(text: str, reference: dict) -> tuple[bool, bool]:
    """(valid against the schema, equal to the reference)."""
    try:
        answer = json.loads(text)
        jsonschema.validate(answer, SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False, False
    return True, answer == reference


async def chat(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int,
               guided: bool) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    if guided:
        body["response_format"] = RESPONSE_FORMAT
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        answer = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {answer}")
        return answer


async def validity(url: str, tests: list[Order], max_tokens: int) -> list[dict]:
    """One row per (model, guided): the shares of valid and exact answers, and how the answers ended."""
    rows = []
    async with aiohttp.ClientSession() as session:
        for model in (BASE, ADAPTER):
            for guided in (False, True):
                answers = await asyncio.gather(*(chat(session, url, model, t.prompt, max_tokens, guided)
                                                 for t in tests))
                verdicts = [verdict(a["choices"][0]["message"]["content"] or "", t.reference)
                            for a, t in zip(answers, tests)]
                rows.append({"model": model, "guided": guided, "answers": len(tests),
                             "valid": sum(v for v, _ in verdicts) / len(tests),
                             "exact": sum(e for _, e in verdicts) / len(tests),
                             "cut_short": sum(a["choices"][0]["finish_reason"] == "length" for a in answers),
                             "mean_tokens": statistics.mean(a["usage"]["completion_tokens"] for a in answers)})
    return rows


async def throughput(url: str, models: list[str], tests: list[Order], guided_every: int | None, requests: int,
                     concurrency: int, max_tokens: int) -> dict:
    """Output tokens per second of `requests` chat requests over `models` round robin, `concurrency` at a time;
    every `guided_every`-th asks for the schema (None: none does)."""
    queue = list(range(requests))
    tokens = []

    async def worker(session):
        while queue:
            i = queue.pop()
            guided = guided_every is not None and i % guided_every == 0
            answer = await chat(session, url, models[i % len(models)], tests[i % len(tests)].prompt, max_tokens, guided)
            tokens.append(answer["usage"]["completion_tokens"])

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=1800)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {"output_tokens_per_s": sum(tokens) / seconds, "seconds": seconds, "mean_tokens": statistics.mean(tokens)}


def compile_times(model: str | None) -> dict[str, float]:
    """ms to compile each guide of COMPILED, in order, with a fresh engine's grammars on the model's tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    grammars = Grammars(tokenizer, AutoConfig.from_pretrained(path).vocab_size, frozenset({tokenizer.eos_token_id}),
                        max_rows=1, device=torch.device("cpu"), compile_timeout=600)
    times = {}
    for label, guide in COMPILED.items():
        started = time.perf_counter()
        asyncio.run(grammars.matcher(guide))
        times[label] = 1e3 * (time.perf_counter() - started)
    grammars.shutdown()
    return times


def grammar_metrics(server: pb.Server) -> dict:
    samples = server.metrics()
    steps = samples.get("loradock_grammar_mask_seconds_count", 0.0)
    return {"mask_ms_per_step": 1e3 * samples["loradock_grammar_mask_seconds_sum"] / steps if steps else None,
            "masked_steps": steps}


def format_tables(validity_rows: list[dict], rounds: list[dict], grammar: dict, compiles: dict[str, float]) -> str:
    lines = ["| model | response_format | valid | exact | cut short | mean tokens |", "|---|---|---:|---:|---:|---:|"]
    for row in validity_rows:
        lines.append(f"| {row['model']} | {'json_schema' if row['guided'] else 'none'} | {row['valid']:.0%} | "
                     f"{row['exact']:.0%} | {row['cut_short']}/{row['answers']} | {row['mean_tokens']:.1f} |")
    lines += ["", "| round | none tok/s | half guided tok/s | ratio |", "|---|---:|---:|---:|"]
    for i, r in enumerate(rounds):
        lines.append(f"| {i + 1} | {r['none']['output_tokens_per_s']:.1f} | {r['half']['output_tokens_per_s']:.1f} | "
                     f"{r['half']['output_tokens_per_s'] / r['none']['output_tokens_per_s']:.3f} |")
    ratio = statistics.median(r["half"]["output_tokens_per_s"] / r["none"]["output_tokens_per_s"] for r in rounds)
    lines += ["", f"median ratio half guided / none: {ratio:.3f} (goal >= 0.9)",
              f"grammar mask: {grammar['mask_ms_per_step']:.2f} ms per step with guided rows "
              f"({grammar['masked_steps']:.0f} steps)", "", "| compiled cold | ms |", "|---|---:|"]
    lines += [f"| {label} | {ms:.1f} |" for label, ms in compiles.items()]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m loradock.loadtest.structured_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="local HF model dir or built-in name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--train", type=int, default=320, help="training orders (default 320)")
    p.add_argument("--steps", type=int, default=40, help="training steps of 8 rows (default 40)")
    p.add_argument("--test", type=int, default=64, help="held-out orders (default 64)")
    p.add_argument("--max-tokens", type=int, default=400, help="per answer of the validity runs (default 400)")
    p.add_argument("--load-max-tokens", type=int, default=96, help="per answer of the throughput runs (default 96)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=128, help="per throughput run (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the two arms (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "loradock-structured-bench"),
                   help="adapters and the server's log (the trained adapter is reused when present)")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the server
    hardware = describe_hardware(torch.device("cpu"))
    print(format_hardware(hardware), flush=True)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_adapter(args, work)
    others = [f"adapter-{i}" for i in range(1, 8)]
    if not all((work / "adapters" / name).exists() for name in others):
        write_bench_adapters(resolve_model_path(args.model), work / "adapters", range(1, 8), rank=16)
    _, tests = split(args.seed, args.train, args.test)
    compiles = compile_times(args.model)
    port = pb.free_port()
    argv = [sys.executable, "-m", "loradock", "serve", "--port", str(port), "--served-model-name", BASE,
            "--adapters", str(work / "adapters"), "--max-lora-rank", "16", "--max-model-len", "1024"]
    if args.model:
        argv += ["--model", args.model]
    began = time.time()
    with pb.Server("loradock", argv, port, None, work, work, startup_timeout=180) as server:
        models = [ADAPTER, *others]
        asyncio.run(throughput(server.url, models, tests, 2, len(models), len(models), 8))  # adapters read, warm
        validity_rows = asyncio.run(validity(server.url, tests, args.max_tokens))
        for row in validity_rows:
            print(row, file=sys.stderr, flush=True)
        rounds = []
        for round_ in range(args.repeats):
            arms = {}
            for arm, every in (("none", None), ("half", 2)) if round_ % 2 == 0 else (("half", 2), ("none", None)):
                arms[arm] = asyncio.run(throughput(server.url, models, tests, every, args.requests, args.concurrency,
                                                   args.load_max_tokens))
                print(f"round {round_ + 1}/{args.repeats} {arm:<5} {arms[arm]['output_tokens_per_s']:7.1f} tok/s",
                      file=sys.stderr, flush=True)
            rounds.append(arms)
        grammar = grammar_metrics(server)
    tables = format_tables(validity_rows, rounds, grammar, compiles)
    print(f"\n{hardware['cpu']}, {hardware['cpu_cores']}, torch {hardware['torch']}\n\n{tables}")
    if args.json:
        saved = {"hardware": hardware, "settings": vars(args), "validity": validity_rows, "rounds": rounds,
                 "grammar": grammar, "compiles_ms": compiles, "tables": tables, "seconds": time.time() - began}
        Path(args.json).write_text(json.dumps(saved, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
