"""The LoRA layers of one decode step on the CPU, back to back, with the adapter weights cold as in the engine:
base GEMMs alone, each GEMM followed by the kernel on the same thread (`lora_apply`), and each layer as served
(`lora_linear`: the kernel on a helper thread while the GEMM runs).

    python -m loradock.loadtest.layer_bench [--model DIR] [--tokens 32] [--adapters 8] [--rank 16] [--steps 60] \
        [--dtype float32|bfloat16]

The layers are the linears the engine wraps (all but the output head, `BaseModelInfo`; shapes from the model's
config.json, random weights, in the server's dtype here unless --dtype says otherwise), every one with `--adapters`
rank-`--rank` slots; token t uses adapter t % adapters.
Between steps a 64 MB buffer is written, so each step reads its weights from memory, as an engine step does. Variants alternate step by step;
the median and the 10th percentile per step are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from ..adapters.peft_format import BaseModelInfo
from ..kernels.cpu_build import cpu_ops
from ..kernels.cpu_lora import CpuBackend
from ..kernels.lora import LoraMeta, LoraOperands, lora_operands
from ..serve.engine.threads import use_serving_threads
from ..serve.models.dtype import DTYPES, choose_dtype
from ..serve.models.source import resolve_model_path
from .hardware import describe_hardware, format_hardware

Layer = tuple[torch.nn.Linear, LoraOperands, torch.Tensor]  # base linear, slot buffers as operands, x [T, in]


def lora_layer_shapes(model_path) -> list[tuple[int, int]]:
    """(in, out) of every linear the engine wraps in a LoRA layer (all but the output head), in model order; the
    model is built from its config on the meta device, so no weight is read."""
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return list(BaseModelInfo.from_model(model).linear_modules.values())


def make_layers(shapes: list[tuple[int, int]], tokens: int, adapters: int, rank: int,
                dtype: torch.dtype) -> list[Layer]:
    layers = []
    cpu = torch.device("cpu")
    for fin, fout in shapes:
        base = torch.nn.Linear(fin, fout, bias=False, dtype=dtype)
        A, B = CpuBackend().slot_buffers(adapters, rank, fin, fout, dtype, cpu)  # [S, R, in], [S, out, R]
        A.copy_(torch.randn(A.shape) * 0.05)
        B.copy_(torch.randn(B.shape) * 0.05)
        scales, ranks = torch.ones(adapters), torch.full((adapters,), rank, dtype=torch.int32)  # [S], [S]
        layers.append((base, lora_operands(A, B, scales, ranks), torch.randn(tokens, fin, dtype=dtype)))
    return layers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.layer_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="local HF model directory or built-in name, for its config (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens in the step (default 32)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant (default 60)")
    parser.add_argument("--threads", type=int, help="torch threads (default: as `loradock serve`, cores - 1)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: the server's on this CPU")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else choose_dtype("auto", torch.device("cpu")).dtype
    use_serving_threads(args.threads)
    if cpu_ops() is None:
        raise SystemExit("the compiled CPU ops did not build: nothing to measure")
    layers = make_layers(lora_layer_shapes(resolve_model_path(args.model)), args.tokens, args.adapters, args.rank,
                         dtype)
    meta = LoraMeta(args.tokens, args.adapters, "cpu")
    meta.update([t % args.adapters for t in range(args.tokens)])
    backend = CpuBackend()
    variants: dict[str, Callable[[torch.nn.Linear, LoraOperands, torch.Tensor], object]] = {
        "base GEMMs only": lambda base, ops, x: F.linear(x, base.weight),
        "GEMM, then the kernel": lambda base, ops, x: backend.add_lora(F.linear(x, base.weight), x, ops, meta),
        "kernel alongside the GEMM": lambda base, ops, x: backend.linear(base, x, ops, meta),
    }
    evict = torch.zeros(16 * 2**20)  # 64 MB, written between steps
    timings: dict[str, list[float]] = {name: [] for name in variants}
    print(format_hardware(describe_hardware(torch.device("cpu"))))
    with torch.inference_mode():
        for step in range(args.steps + 3):  # the first 3 warm up
            for name, layer_call in variants.items():
                evict.add_(1.0)
                started = time.perf_counter()
                for base, ops, x in layers:
                    layer_call(base, ops, x)
                if step >= 3:
                    timings[name].append(1e3 * (time.perf_counter() - started))
    print(f"\n{len(layers)} LoRA layers in {str(dtype).removeprefix('torch.')}, {args.tokens} tokens over "
          f"{args.adapters} rank-{args.rank} adapters, "
          f"{torch.get_num_threads()} torch thread(s), caches flushed between steps; ms per step:")
    base_ms = statistics.median(timings["base GEMMs only"])
    for name, values in timings.items():
        median, p10 = statistics.median(values), sorted(values)[len(values) // 10]
        print(f"  {name:<27} median {median:6.3f}  p10 {p10:6.3f}  ({median - base_ms:+.3f} on the GEMMs)")


if __name__ == "__main__":
    main()
