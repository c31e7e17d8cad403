"""Where the engine's LoRA cost goes on the CPU: the same workload in alternating passes (engine, no HTTP), each
timed per engine step, with the LoRA layers as served, with the kernel after the GEMM on the engine thread, or
with the kernel stubbed out.

    python -m loradock.loadtest.lora_cost --adapters-dir DIR --rounds 6

- base: every request on the base model (no LoRA work at all);
- stubbed: adapters, every LoRA layer runs (metadata, checks, dispatch, the base GEMM) but no LoRA arithmetic;
- serial: the kernel runs on the engine thread after each base GEMM (`lora_apply`);
- overlapped: as served (`lora_linear`): the kernel runs on a helper thread during the base GEMM.
serial minus stubbed is what the kernel costs the step when it follows the GEMM; overlapped minus stubbed is what
is left of it when it runs alongside.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

import torch.nn.functional as F

from ..kernels.cpu_build import cpu_ops
from ..serve.engine.threads import use_serving_threads
from ..serve.engine import Engine, EngineConfig
from ..serve.models.source import resolve_model_path
from .engine_bench import _engine_pass, make_prompts
from .hardware import describe_hardware, format_hardware
from .lora_bench import adapter_names


def ms_per_step(engine: Engine, prompts, names, concurrency: int, max_tokens: int) -> float:
    first = engine.steps
    wall, _ = asyncio.run(_engine_pass(engine, prompts, concurrency, max_tokens, names))
    return 1e3 * wall / (engine.steps - first)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.lora_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="local HF model directory or built-in name (default: SmolLM2-135M-Instruct; tiny-random: the toy)")
    parser.add_argument("--adapters-dir", required=True, help="adapter-0 .. adapter-{N-1} (random_adapters writes them)")
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters, round robin (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="largest adapter rank (default 16)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    use_serving_threads()
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
    served = compiled.lora_linear

    def serial(x, weight, bias, *operands):
        y = F.linear(x, weight, bias)
        compiled.lora_apply(y, x, *operands)
        return y

    def stubbed(x, weight, bias, *operands):
        return F.linear(x, weight, bias)

    variants = {"stubbed": stubbed, "serial": serial, "overlapped": served}
    print(format_hardware(describe_hardware(engine.device)))
    prompts = make_prompts(engine.tokenizer, engine.vocab_size, args.requests, (16, 64), 0)
    names = adapter_names(args.adapters, args.requests)
    timings: dict[str, list[float]] = {"base": [], **{name: [] for name in variants}}
    with engine:
        ms_per_step(engine, prompts[: args.concurrency], names[: args.concurrency], args.concurrency, 4)  # warm up
        try:
            for _ in range(args.rounds):
                compiled.lora_linear = served
                timings["base"].append(ms_per_step(engine, prompts, [None] * len(prompts), args.concurrency,
                                                   args.max_tokens))
                for name, op in variants.items():
                    compiled.lora_linear = op
                    timings[name].append(ms_per_step(engine, prompts, names, args.concurrency, args.max_tokens))
                print("  ".join(f"{name} {values[-1]:.2f}" for name, values in timings.items()), flush=True)
        finally:
            compiled.lora_linear = served
    median = {name: statistics.median(values) for name, values in timings.items()}
    print(f"\nms per engine step, median of {args.rounds} rounds ({args.adapters} adapters, concurrency "
          f"{args.concurrency}):")
    for name, value in median.items():
        print(f"  {name:<13} {value:6.2f}  ({value - median['base']:+.2f} on base)")
    print(f"the kernel after the GEMM {median['serial'] - median['stubbed']:.2f} ms a step, alongside it "
          f"{median['overlapped'] - median['stubbed']:.2f} ms; the LoRA layers without the kernel "
          f"{median['stubbed'] - median['base']:.2f} ms; adapters/base {median['base'] / median['overlapped']:.3f} "
          f"(serial {median['base'] / median['serial']:.3f})")


if __name__ == "__main__":
    main()
