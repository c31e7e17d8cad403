"""Where an engine step's time goes: wall time per step, device kernel time per step (CUDA), and the engine
thread's Python profile, for the base model alone and with k adapters in the batch.

    python -m loradock.loadtest.step_profile --model DIR --adapters 8 --concurrency 32

Each run: the timed workload through `engine_bench.run_engine` (tok/s, TPOT), then a short profiled pass of
`--concurrency` requests of --profile-tokens tokens under torch.profiler (device kernels) with cProfile on the
engine thread (torch.profiler records the CPU ops of the thread that starts it only, and the engine steps in its
own thread). On CUDA the gap between wall and kernel time per step is what the host spends launching work.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ..serve.engine.threads import use_serving_threads
from ..serve.engine import Engine, EngineConfig
from ..serve.engine.batch import is_decode
from ..serve.models.source import resolve_model_path
from .engine_bench import _engine_pass, make_prompts, run_engine
from .hardware import describe_hardware, format_hardware
from .lora_bench import adapter_names
from .random_adapters import write_bench_adapters


@contextmanager
def python_profile_of_steps(engine: Engine):
    """cProfile enabled around each engine step (in the engine's thread) while the block runs."""
    profiler = cProfile.Profile()
    step = engine._step

    def profiled_step(entries):
        profiler.enable()
        try:
            step(entries)
        finally:
            profiler.disable()

    engine._step = profiled_step
    try:
        yield profiler
    finally:
        engine._step = step


@dataclass(frozen=True)
class StepTiming:
    """One engine step: its wall time, its CUDA events (first and last kernel; None on the CPU), what it ran."""

    wall_s: float
    events: list | None
    decode_only: bool
    rows: int  # requests in the step


@contextmanager
def step_breakdown(engine: Engine):
    """Per engine step while the block runs: wall time, and on CUDA the device's span from the step's first to its
    last kernel (CUDA events); yields a list filled with one StepTiming per step."""
    run, rows = engine.runner.run, []

    def timed_run(entries):
        cuda = engine.device.type == "cuda"
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None
        started = time.perf_counter()
        if cuda:
            events[0].record()
        result = run(entries)
        if cuda:
            events[1].record()
        result.logits.sum().item()  # the step's end, as sampling would wait for it
        rows.append(StepTiming(time.perf_counter() - started, events, all(is_decode(r, n) for r, n in entries),
                               len(entries)))
        return result

    engine.runner.run = timed_run
    try:
        yield rows
    finally:
        engine.runner.run = run


def print_breakdown(rows: list[StepTiming]) -> None:
    """Median ms per decode step: wall, device span, host (wall minus device span)."""
    decode = [(step.wall_s, step.events) for step in rows if step.decode_only]
    if not decode:
        return
    wall = statistics.median(w for w, _ in decode) * 1e3
    line = f"decode steps: {len(decode)}, median wall {wall:.2f} ms"
    if decode[0][1] is not None:
        span = statistics.median(e[0].elapsed_time(e[1]) for _, e in decode)
        line += f", device span {span:.2f} ms ({span / wall:.0%} of wall), host {wall - span:.2f} ms"
    print(line)


def profile_run(engine: Engine, prompts, names, args) -> None:
    """Time the workload (with a per-step breakdown), then profile a short pass of it; print both."""
    with step_breakdown(engine) as rows:
        run = run_engine(engine, prompts, args.concurrency, args.max_tokens, names)
    print(f"\n=== {len(set(names) - {None})} adapters: {run.tokens_per_s:.1f} tok/s, TPOT {run.mean_tpot_ms:.2f} ms, "
          f"TTFT {run.mean_ttft_ms:.1f} ms", flush=True)
    print_breakdown(rows)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    first_step = engine.steps
    with python_profile_of_steps(engine) as python_profile, profile(activities=activities) as device_profile:
        wall, _ = asyncio.run(
            _engine_pass(engine, prompts[: args.concurrency], args.concurrency, args.profile_tokens,
                         names[: args.concurrency])
        )
    steps = engine.steps - first_step
    line = f"profiled: {steps} steps, wall {1e3 * wall / steps:.2f} ms/step (profilers on)"
    if engine.device.type == "cuda":
        events = device_profile.key_averages()
        kernel_us = sum(event.self_device_time_total for event in events)
        print(f"{line}, device kernels {kernel_us / 1e3 / steps:.2f} ms/step")
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    else:
        print(line)
    pstats.Stats(python_profile, stream=sys.stdout).sort_stats("tottime").print_stats(args.rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.step_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="local HF model directory or built-in name (default: SmolLM2-135M-Instruct; tiny-random: the toy)")
    parser.add_argument("--quantize", choices=("nf4", "int8", "none"), help="default nf4 on CUDA, none on CPU")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, decode steps replayed from CUDA graphs (default on)")
    parser.add_argument("--adapters", type=int, default=8, help="distinct rank-16 adapters, round robin (default 8)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--profile-tokens", type=int, default=16, help="tokens per request of the profiled pass")
    parser.add_argument("--rows", type=int, default=20, help="rows of each table")
    args = parser.parse_args(argv)
    use_serving_threads()
    path = resolve_model_path(args.model)
    with tempfile.TemporaryDirectory(prefix="loradock-profile-adapters-") as adapter_dir:
        started = time.perf_counter()
        write_bench_adapters(path, Path(adapter_dir), range(args.adapters), 16)
        engine = Engine.from_config(
            EngineConfig(
                model=str(path), quantize=args.quantize, device=args.device, adapters_dir=adapter_dir,
                max_gpu_adapters=max(args.adapters, 1), max_lora_rank=16, max_num_seqs=args.concurrency,
                max_model_len=64 + args.max_tokens, cuda_graphs=args.cuda_graphs,
            )
        )
        print(format_hardware(describe_hardware(engine.device)))
        print(f"model {path}; adapters written and engine up in {time.perf_counter() - started:.0f} s")
        prompts = make_prompts(engine.tokenizer, engine.vocab_size, args.requests, (16, 64), 0)
        with engine:
            for count in (0, args.adapters):
                profile_run(engine, prompts, adapter_names(count, args.requests), args)


if __name__ == "__main__":
    main()
