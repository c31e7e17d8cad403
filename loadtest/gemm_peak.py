"""The CPU's measured matrix-multiply peak: GFLOP/s of large GEMMs through torch (oneDNN: AMX or AVX512-BF16 in
bfloat16 where the CPU has them), in float32 and bfloat16, at the serving thread count. The ceiling the engine's
decode steps are measured against (`bf16_cpu_bench`).

    python -m loradock.loadtest.gemm_peak [--threads N] [--budget-s S]
"""

from __future__ import annotations

import argparse
import time

import torch

from ..serve.engine.threads import use_serving_threads
from .hardware import describe_hardware, format_hardware

SHAPES = ((512, 2048, 2048), (256, 4096, 1024), (1024, 1024, 4096))  # (M, K, N): each compute-bound
DTYPES = (torch.float32, torch.bfloat16)


def gemm_gflops(dtype: torch.dtype, m: int, k: int, n: int, budget_s: float) -> float:
    """The best GFLOP/s of x [m, k] @ w [k, n] over repeated calls for `budget_s` seconds."""
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(x, w)  # warm up: oneDNN builds its kernel for the shape on the first call
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < budget_s:
        begin = time.perf_counter()
        torch.mm(x, w)
        best = min(best, time.perf_counter() - begin)
    return 2 * m * k * n / best / 1e9


def gemm_peak(dtype: torch.dtype, budget_s: float = 1.0) -> tuple[float, tuple[int, int, int]]:
    """(the best GFLOP/s of SHAPES in `dtype`, the shape that gave it)."""
    return max((gemm_gflops(dtype, *shape, budget_s), shape) for shape in SHAPES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.gemm_peak", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, help="torch compute threads (default: as `loradock serve`)")
    parser.add_argument("--budget-s", type=float, default=1.0, help="seconds of calls per shape (default 1)")
    args = parser.parse_args(argv)
    use_serving_threads(args.threads)
    print(format_hardware(describe_hardware(torch.device("cpu"))) + "\n")
    for dtype in DTYPES:
        gflops, (m, k, n) = gemm_peak(dtype, args.budget_s)
        print(f"{str(dtype).removeprefix('torch.'):<9} {gflops:8.1f} GFLOP/s  ([{m}, {k}] @ [{k}, {n}])")


if __name__ == "__main__":
    main()
