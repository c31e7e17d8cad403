"""Gathered-LoRA microbenchmark: the op against the torch reference, one adapter's plain mm, and the base layer.

On CPU (in the server's dtype there, or --dtype): the compiled kernel (`cpu_lora`, the engine's CPU path), the
oracle (`lora_reference`), the torch fallback path (auto, and each strategy forced), a single-adapter
`x @ A.T @ B.T` of the same rank, and an nn.Linear of the same in/out (the base layer's own time), on the demo
model's layer shapes and a 4096-wide one, for decode (T=32; 1, 8, 32 adapters), 31 decode tokens with a 225-token
prefill chunk (T=256), and prefill (T=512; 1, 4, 32 adapters).
On CUDA (bf16): the Triton kernels, the reference, the single-adapter mm, the base Linear and, when
bitsandbytes imports, an nf4 Linear4bit, on 8B-model decode shapes (in 4096; out 4096, 14336; ranks 8-64 in
rank-64 slot buffers; 1-64 adapters; T=64). GB/s is the bytes the op must move (x, the used adapters' weights
up to their rank, y read and written) over the time; % peak relates it to the device's memory bandwidth.

    python -m loradock.loadtest.kernel_bench [--device cpu|cuda] [--dtype float32|bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch

from ..kernels.cpu_build import cpu_ops
from ..kernels.cpu_lora import CpuBackend
from ..kernels.lora import LoraMeta, lora_operands, lora_reference, select_lora_backend
from ..kernels.torch_lora import TorchBackend, run_plan
from ..kernels.torch_plan import plan_segments
from ..serve.models.dtype import DTYPES, choose_dtype
from .hardware import describe_hardware, format_hardware

REFERENCE_MAX_GATHER_BYTES = 512 * 2**20  # skip the oracle where its per-token weight copies exceed this


@dataclass(frozen=True)
class Shape:
    """One benchmarked configuration of the op."""

    in_features: int
    out_features: int
    rank: int  # every adapter's real rank
    max_rank: int  # R: the slot buffers' padded rank
    tokens: int  # T
    adapters: int  # distinct adapters in the step
    layout: str  # 'decode': token t uses adapter t % adapters; 'prefill': contiguous runs, one per adapter;
    # 'mixed': adapters-1 decode tokens on their own adapters, then one prefill chunk on the last adapter
    slots: int  # S: slots in the buffers

    def describe(self) -> str:
        return (
            f"in {self.in_features} out {self.out_features}  r {self.rank} (R {self.max_rank})  "
            f"T {self.tokens} {self.layout}, {self.adapters} adapter{'s' if self.adapters > 1 else ''}"
        )


@dataclass
class Result:
    """One variant timed on one shape."""

    shape: Shape
    variant: str
    median_ms: float
    best_ms: float
    gb_per_s: float
    percent_of_peak: float | None
    vs_base: float | None  # median time over the base layer's


def cpu_shapes() -> list[Shape]:
    """Demo-model layers (q/o 256x256, gate/up 256x688, down 688x256) and an 8B-wide 4096x4096 layer."""
    layers = [(256, 256), (256, 688), (688, 256), (4096, 4096)]
    steps = [
        (32, 1, "decode"),
        (32, 8, "decode"),
        (32, 32, "decode"),
        (256, 32, "mixed"),
        (512, 1, "prefill"),
        (512, 4, "prefill"),
        (512, 32, "prefill"),
    ]
    return [
        Shape(fin, fout, rank, rank, tokens, adapters, layout, slots=32)
        for fin, fout in layers
        for rank in (16, 64)
        for tokens, adapters, layout in steps
    ]


def cuda_shapes() -> list[Shape]:
    """8B-model decode: hidden 4096 into 4096 (attention) and 14336 (MLP), T=64, ranks in rank-64 slots."""
    return [
        Shape(4096, fout, rank, 64, 64, adapters, "decode", slots=64)
        for fout in (4096, 14336)
        for rank in (8, 16, 32, 64)
        for adapters in (1, 8, 32, 64)
    ]


def token_slots(shape: Shape) -> torch.Tensor:
    """[T] int64 on the host: the adapter slot of each token."""
    positions = torch.arange(shape.tokens)
    if shape.layout == "decode":
        return positions % shape.adapters
    if shape.layout == "mixed":
        return positions.clamp(max=shape.adapters - 1)
    return positions * shape.adapters // shape.tokens


def lora_bytes(shape: Shape, element_size: int, adapters: int) -> int:
    """Bytes the op must move: x, `adapters` adapters' A and B up to their rank, y in and out, fp32 buf."""
    weights = adapters * shape.rank * (shape.in_features + shape.out_features)
    activations = shape.tokens * (shape.in_features + 2 * shape.out_features)
    return (weights + activations) * element_size + 2 * shape.tokens * shape.rank * 4


def variants(shape: Shape, device: torch.device, dtype: torch.dtype) -> list[tuple[str, Callable[[], object], int]]:
    """(name, callable, bytes moved) of each variant on `shape`; the base layer comes last."""
    T, fin, fout, R, S = shape.tokens, shape.in_features, shape.out_features, shape.max_rank, shape.slots
    size = dtype.itemsize
    x = torch.randn(T, fin, device=device, dtype=dtype)  # [T, in]
    y = torch.zeros(T, fout, device=device, dtype=dtype)  # [T, out]
    backend = select_lora_backend(device)
    A, B = backend.slot_buffers(S, R, fin, fout, dtype, device)  # [S, R, in], [S, out, R]: the LoRA layers' layout
    A.copy_(torch.randn(A.shape, device=device) * 0.01)
    B.copy_(torch.randn(B.shape, device=device) * 0.01)
    scales = torch.ones(S, device=device)  # [S]
    ranks = torch.full((S,), shape.rank, dtype=torch.int32, device=device)  # [S]
    slots = token_slots(shape)  # [T] host
    meta = LoraMeta(T, S, device)
    meta.update(slots.tolist())
    slots = slots.to(device)
    op_bytes = lora_bytes(shape, size, shape.adapters)
    a1, b1 = A[0, : shape.rank], B[0, :, : shape.rank]  # [r, in], [out, r]: one adapter
    base = torch.nn.Linear(fin, fout, bias=False, device=device, dtype=dtype)
    base_bytes = (fin * fout + T * (fin + fout)) * size

    ops = lora_operands(A, B, scales, ranks)
    found: list[tuple[str, Callable[[], object], int]] = []
    if device.type == "cuda":
        found.append(("triton", partial(backend.add_lora, y, x, ops, meta), op_bytes))
    else:
        if cpu_ops() is not None:
            found.append(("cpp (compiled kernel)", partial(CpuBackend().add_lora, y, x, ops, meta), op_bytes))
        plan = plan_segments(meta.segments, meta.order, device)
        chosen = "loop" if plan.batched is None else f"{len(plan.loop)} loop+batched" if plan.loop else "batched"
        found.append((f"torch (auto: {chosen})", partial(TorchBackend().add_lora, y, x, ops, meta), op_bytes))
        for strategy in ("loop", "batched"):
            forced = plan_segments(meta.segments, meta.order, device, strategy)
            found.append((f"torch {strategy}", partial(run_plan, y, x, ops, forced, meta), op_bytes))
    if T * R * (fin + fout) * size <= REFERENCE_MAX_GATHER_BYTES:
        found.append(("reference", partial(lora_reference, y, x, A, B, scales, ranks, slots), op_bytes))
    found.append(("mm, 1 adapter", lambda: y.addmm_(x @ a1.T, b1.T), lora_bytes(shape, size, 1)))
    found.extend(nf4_base(fin, fout, x))
    found.append((f"base Linear {str(dtype).removeprefix('torch.')}", partial(base, x), base_bytes))
    return found


def nf4_base(in_features: int, out_features: int, x: torch.Tensor) -> list[tuple[str, Callable[[], object], int]]:
    """A bitsandbytes nf4 Linear4bit of the same shape (CUDA only, when bitsandbytes imports), else nothing."""
    if x.device.type != "cuda":
        return []
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=x.dtype, quant_type="nf4")
    layer = layer.to(x.device)
    state = layer.weight.quant_state
    nested = getattr(state, "state2", None)  # the absmax of the absmax, when statistics are compressed
    weight_bytes = layer.weight.nbytes + state.absmax.nbytes + (nested.absmax.nbytes if nested is not None else 0)
    activation_bytes = x.shape[0] * (in_features + out_features) * x.element_size()
    return [("base nf4 Linear4bit", lambda: layer(x), weight_bytes + activation_bytes)]


def time_ms(fn: Callable[[], object], device: torch.device, budget_s: float) -> tuple[float, float]:
    """(median, best) milliseconds per call. CUDA: triton's do_bench; CPU: repeated calls for `budget_s`."""
    if device.type == "cuda":
        from triton.testing import do_bench

        median, best = do_bench(fn, quantiles=[0.5, 0.0])
        return median, best
    fn()  # warm up
    times = []
    started = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - started < budget_s:
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e3, min(times) * 1e3


def peak_bandwidth_gbs(device: torch.device, override: float | None) -> float | None:
    """The device's memory bandwidth in GB/s: --bandwidth-gbs, else from the CUDA properties, else None."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None  # double data rate


def bench_shape(
    shape: Shape, device: torch.device, dtype: torch.dtype, peak: float | None, budget_s: float
) -> list[Result]:
    """Time every variant on one shape; peak: memory bandwidth in GB/s, if known."""
    timed = []
    with torch.inference_mode():
        for name, fn, moved in variants(shape, device, dtype):
            median, best = time_ms(fn, device, budget_s)
            gbs = moved / (median * 1e-3) / 1e9
            timed.append(Result(shape, name, median, best, gbs, 100 * gbs / peak if peak else None, None))
    base_ms = timed[-1].median_ms
    for result in timed:
        result.vs_base = result.median_ms / base_ms
    return timed


def format_results(results: list[Result]) -> str:
    """One block per shape: variant, median and best ms, GB/s, % of peak bandwidth, time relative to base."""
    lines = [results[0].shape.describe()]
    lines.append(f"  {'variant':<24}{'median ms':>11}{'best ms':>10}{'GB/s':>9}{'% peak':>8}{'x base':>8}")
    for r in results:
        peak = f"{r.percent_of_peak:.1f}" if r.percent_of_peak is not None else "-"
        lines.append(
            f"  {r.variant:<24}{r.median_ms:>11.4f}{r.best_ms:>10.4f}{r.gb_per_s:>9.1f}{peak:>8}{r.vs_base:>8.3f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loradock.loadtest.kernel_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", help="cpu | cuda (default cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="on the CPU (default: the server's there)")
    parser.add_argument(
        "--bandwidth-gbs", type=float, help="memory bandwidth for %% of peak (default: from the CUDA properties)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=0.25, help="CPU: seconds of repeated calls per measurement (default 0.25)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if device.type == "cuda":
        dtype, shapes = torch.bfloat16, cuda_shapes()
    else:
        dtype, shapes = DTYPES[args.dtype] if args.dtype else choose_dtype("auto", device).dtype, cpu_shapes()
    peak = peak_bandwidth_gbs(device, args.bandwidth_gbs)
    hardware = describe_hardware(device)
    print(format_hardware(hardware))
    bandwidth = f"{peak:.0f} GB/s" if peak else "unknown (--bandwidth-gbs)"
    print(f"dtype {str(dtype).removeprefix('torch.')}, peak memory bandwidth {bandwidth}\n")
    results = []
    for shape in shapes:
        timed = bench_shape(shape, device, dtype, peak, args.budget_s)
        print(format_results(timed) + "\n", flush=True)
        results.extend(timed)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"hardware": hardware, "results": [asdict(r) for r in results]}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
