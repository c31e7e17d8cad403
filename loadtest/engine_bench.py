"""Engine throughput: loradock's continuous batching against Hugging Face `generate` in static batches.

For each concurrency C the same seeded prompts (random token ids) run first through the loradock engine with
at most C requests in flight, then, once the engine is shut down, through `model.generate` of the same model,
loaded the same way, in static batches of C prompts (left padded). Both decode greedily and emit exactly
--max-tokens tokens per request, so output tokens per second compare like for like.

    python -m loradock.loadtest.engine_bench --concurrency 1,8,32 --json bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
from transformers.utils import logging as hf_logging

from ..serve.engine.threads import use_serving_threads
from ..serve.engine import Engine, EngineConfig, RequestError, SamplingParams
from ..serve.models.dtype import choose_dtype
from ..serve.models.loader import (
    ModelLoadError,
    default_quantize,
    load_model,
    resolve_device,
)
from ..serve.models.source import resolve_model_path
from .hardware import describe_hardware, format_hardware

WARMUP_TOKENS = 4


@dataclass
class EngineRun:
    """One concurrency level through the loradock engine."""

    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    mean_ttft_ms: float  # submission to first token
    mean_tpot_ms: float  # time per output token after the first


@dataclass
class GenerateRun:
    """One concurrency level through HF `generate` in static batches."""

    batch_size: int
    requests: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loradock.loadtest.engine_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", help="local HF model directory or built-in name (default: SmolLM2-135M-Instruct; tiny-random: the toy)")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated requests in flight (default 1,8,32)")
    parser.add_argument("--requests", type=int, help="requests per concurrency level (default max(8*C, 32))")
    parser.add_argument("--prompt-len", default="16:64", help="prompt lengths MIN:MAX, uniform (default 16:64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--quantize", choices=("nf4", "int8", "none"), help="default nf4 on CUDA, none on CPU")
    parser.add_argument("--device", help="cpu | cuda (default cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt set (default 0)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: as `loradock serve`, cores - 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
        low, _, high = args.prompt_len.partition(":")
        args.prompt_len = (int(low), int(high or low))
    except ValueError:
        parser.error("--concurrency takes integers like 1,8,32 and --prompt-len takes MIN:MAX like 16:64")
    if min(args.concurrency) < 1 or (args.requests is not None and args.requests < 1) or args.max_tokens < 1:
        parser.error("--concurrency, --requests and --max-tokens must be positive")
    if not 1 <= args.prompt_len[0] <= args.prompt_len[1]:
        parser.error("--prompt-len needs 1 <= MIN <= MAX")
    return args


def make_prompts(tokenizer, vocab_size: int, count: int, lengths: tuple[int, int], seed: int) -> list[list[int]]:
    """`count` prompts of random token ids, lengths uniform in `lengths` (inclusive), no special tokens."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = [t for t in range(min(vocab_size, len(tokenizer))) if t not in special]
    return [rng.choices(ordinary, k=rng.randint(*lengths)) for _ in range(count)]


async def _timed_request(
    engine: Engine, prompt: list[int], params: SamplingParams, slots: asyncio.Semaphore, adapter: str | None
) -> tuple[int, float, float]:
    """Run one request once a slot is free; (tokens, time to first token, time per later token)."""
    async with slots:
        start = time.perf_counter()
        stamps = [time.perf_counter() async for _ in engine.generate(prompt, params, adapter=adapter)]
    per_token = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return len(stamps), stamps[0] - start, per_token


async def _engine_pass(
    engine: Engine, prompts: list[list[int]], concurrency: int, max_tokens: int, adapters: list[str | None]
) -> tuple[float, list[tuple[int, float, float]]]:
    """All `prompts` (request i through adapters[i]) with at most `concurrency` in flight;
    (wall seconds, one timing per request)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    slots = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    timings = await asyncio.gather(*(_timed_request(engine, p, params, slots, a) for p, a in zip(prompts, adapters)))
    return time.perf_counter() - start, timings


def run_engine(
    engine: Engine,
    prompts: list[list[int]],
    concurrency: int,
    max_tokens: int,
    adapters: list[str | None] | None = None,
) -> EngineRun:
    """Warm up with `concurrency` short requests, then time all `prompts` (request i through adapters[i],
    default the base model)."""
    adapters = adapters or [None] * len(prompts)
    asyncio.run(_engine_pass(engine, prompts[:concurrency], concurrency, WARMUP_TOKENS, adapters[:concurrency]))
    wall, timings = asyncio.run(_engine_pass(engine, prompts, concurrency, max_tokens, adapters))
    tokens = sum(n for n, _, _ in timings)
    _check_count(tokens, len(prompts) * max_tokens, "loradock")
    return EngineRun(
        concurrency=concurrency,
        requests=len(prompts),
        output_tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall,
        mean_ttft_ms=1000 * sum(t for _, t, _ in timings) / len(timings),
        mean_tpot_ms=1000 * sum(t for _, _, t in timings) / len(timings),
    )


def _left_padded(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, longest], prompts right-aligned."""
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(batch):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def _generate_pass(model, prompts: list[list[int]], batch_size: int, max_tokens: int, pad_id: int) -> tuple[float, int]:
    """`prompts` in static batches through `model.generate`; (wall seconds, tokens generated)."""
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        ids, mask = _left_padded(prompts[i : i + batch_size], pad_id, model.device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            pad_token_id=pad_id,
        ).cpu()  # waits for the device
        tokens += out[:, ids.shape[1] :].numel()
    return time.perf_counter() - start, tokens


def run_generate(model, prompts: list[list[int]], batch_size: int, max_tokens: int, pad_id: int) -> GenerateRun:
    """Warm up with one short batch, then time all `prompts`."""
    _generate_pass(model, prompts[:batch_size], batch_size, WARMUP_TOKENS, pad_id)
    wall, tokens = _generate_pass(model, prompts, batch_size, max_tokens, pad_id)
    _check_count(tokens, len(prompts) * max_tokens, "HF generate")
    return GenerateRun(batch_size, len(prompts), tokens, wall, tokens / wall)


def _check_count(got: int, expected: int, who: str) -> None:
    if got != expected:
        raise RuntimeError(f"{who} generated {got} tokens, expected {expected}: the comparison would be unfair")


def format_table(engine_runs: list[EngineRun], generate_runs: list[GenerateRun]) -> str:
    header = (
        f"{'concurrency':>11} | {'requests':>8} | {'loradock tok/s':>14} | {'TTFT ms':>8} | {'TPOT ms':>8} | "
        f"{'HF generate tok/s':>17} | {'ratio':>5}"
    )
    lines = [header, "-" * len(header)]
    for ours, theirs in zip(engine_runs, generate_runs):
        lines.append(
            f"{ours.concurrency:>11} | {ours.requests:>8} | {ours.tokens_per_s:>14.1f} | "
            f"{ours.mean_ttft_ms:>8.1f} | {ours.mean_tpot_ms:>8.2f} | {theirs.tokens_per_s:>17.1f} | "
            f"{ours.tokens_per_s / theirs.tokens_per_s:>5.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        bench(args)
    except (ModelLoadError, RequestError) as exc:
        sys.exit(f"error: {exc}")


def bench(args: argparse.Namespace) -> None:
    """Run both sides at every concurrency, print the table, write the JSON."""
    hf_logging.disable_progress_bar()
    use_serving_threads(args.threads)  # the engine as it serves
    device = resolve_device(args.device)
    quantize = args.quantize or default_quantize(device)
    choice = choose_dtype("auto", device)  # the server's default, for the engine and the HF side alike
    dtype, dtype_name = choice.dtype, choice.name
    path = resolve_model_path(args.model)
    hardware = describe_hardware(device)
    print(format_hardware(hardware), flush=True)
    low, high = args.prompt_len
    print(
        f"model {path} (quantize {quantize}, {dtype_name}); prompts of {low}-{high} random tokens, "
        f"{args.max_tokens} generated per request, greedy\n",
        flush=True,
    )

    counts = {c: args.requests or max(8 * c, 32) for c in args.concurrency}
    engine = Engine.from_config(
        EngineConfig(
            model=str(path),
            quantize=quantize,
            dtype=dtype_name,
            device=str(device),
            max_num_seqs=max(args.concurrency),
            max_model_len=args.prompt_len[1] + args.max_tokens,
        )
    )
    prompts = make_prompts(engine.tokenizer, engine.vocab_size, max(counts.values()), args.prompt_len, args.seed)
    pad_id = engine.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = engine.tokenizer.eos_token_id
    engine_runs = []
    with engine:
        for c in args.concurrency:
            engine_runs.append(run_engine(engine, prompts[: counts[c]], c, args.max_tokens))
            print(f"loradock    C={c}: {engine_runs[-1].tokens_per_s:.1f} tok/s", file=sys.stderr, flush=True)
    del engine  # one copy of the model at a time
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    model, _ = load_model(path, quantize, dtype, device)
    generate_runs = []
    for c in args.concurrency:
        generate_runs.append(run_generate(model, prompts[: counts[c]], c, args.max_tokens, pad_id))
        print(f"HF generate C={c}: {generate_runs[-1].tokens_per_s:.1f} tok/s", file=sys.stderr, flush=True)

    print(format_table(engine_runs, generate_runs))
    if args.json:
        report = {
            "hardware": hardware,
            "settings": {
                "model": str(path),
                "quantize": quantize,
                "dtype": dtype_name,
                "prompt_len": list(args.prompt_len),
                "max_tokens": args.max_tokens,
                "seed": args.seed,
            },
            "loradock": [asdict(r) for r in engine_runs],
            "hf_generate": [asdict(r) for r in generate_runs],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
