"""Where the engine's LoRA cost goes on the CPU: the same workload in alternating passes (engine, no HTTP), each
timed per engine step, with the compiled LoRA kernel as it is, stubbed out, or run twice per call.

    python -m loradock.loadtest.lora_cost --adapters-dir DIR --rounds 6

- base: every request on the base model (no LoRA work at all);
- stubbed: adapters, every LoRA layer runs (metadata, checks, dispatch) but the kernel returns at once;
- kernel: as served;
- kernel twice: the kernel runs again right after itself, on weights it has just read. kernel minus stubbed is
  what the kernel costs in a step; kernel twice minus kernel is what it costs with warm caches; the gap between
  the two is the cost of bringing the adapter weights in.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

import torch

from ..kernels import cpu_ops
from ..serve.cli import serving_threads
from ..serve.engine import Engine, EngineConfig
from ..serve.model_loader import resolve_model_path
from .engine_bench import _engine_pass, make_prompts
from .hardware import describe_hardware, format_hardware
from .lora_bench import adapter_names


def ms_per_step(engine: Engine, prompts, names, concurrency: int, max_tokens: int) -> float:
    first = engine.steps
    wall, _ = asyncio.run(_engine_pass(engine, prompts, concurrency, max_tokens, names))
    return 1e3 * wall / (engine.steps - first)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.lora_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="local HF model directory (default: the built-in demo model)")
    parser.add_argument("--adapters-dir", required=True, help="adapter-0 .. adapter-{N-1} (random_adapters writes them)")
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters, round robin (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="largest adapter rank (default 16)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(serving_threads())
    path = resolve_model_path(args.model)
    engine = Engine.from_config(
        EngineConfig(
            model=str(path), adapters_dir=args.adapters_dir, max_gpu_adapters=args.adapters, device="cpu",
            max_lora_rank=args.rank, max_num_seqs=args.concurrency, max_model_len=64 + args.max_tokens,
        )
    )
    compiled = cpu_ops()
    if compiled is None:
        raise SystemExit("the compiled CPU ops did not build: nothing to measure")
    kernel = compiled.lora_apply

    def twice(*operands):
        kernel(*operands)
        kernel(*operands)

    variants = {"kernel": kernel, "stubbed": lambda *operands: None, "kernel twice": twice}
    print(format_hardware(describe_hardware(engine.device)))
    prompts = make_prompts(engine.tokenizer, engine.vocab_size, args.requests, (16, 64), 0)
    names = adapter_names(args.adapters, args.requests)
    timings: dict[str, list[float]] = {"base": [], **{name: [] for name in variants}}
    with engine:
        ms_per_step(engine, prompts[: args.concurrency], names[: args.concurrency], args.concurrency, 4)  # warm up
        try:
            for _ in range(args.rounds):
                compiled.lora_apply = kernel
                timings["base"].append(ms_per_step(engine, prompts, [None] * len(prompts), args.concurrency,
                                                   args.max_tokens))
                for name, op in variants.items():
                    compiled.lora_apply = op
                    timings[name].append(ms_per_step(engine, prompts, names, args.concurrency, args.max_tokens))
                print("  ".join(f"{name} {values[-1]:.2f}" for name, values in timings.items()), flush=True)
        finally:
            compiled.lora_apply = kernel
    median = {name: statistics.median(values) for name, values in timings.items()}
    print(f"\nms per engine step, median of {args.rounds} rounds ({args.adapters} adapters, concurrency "
          f"{args.concurrency}):")
    for name, value in median.items():
        print(f"  {name:<13} {value:6.2f}  ({value - median['base']:+.2f} on base)")
    print(f"kernel in a step {median['kernel'] - median['stubbed']:.2f} ms, of it with warm caches "
          f"{median['kernel twice'] - median['kernel']:.2f} ms; the LoRA layers without the kernel "
          f"{median['stubbed'] - median['base']:.2f} ms")


if __name__ == "__main__":
    main()
