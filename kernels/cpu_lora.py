"""The gathered-LoRA op as a compiled CPU kernel (`cpu_lora.cpp`): the engine's LoRA path on the CPU.

The torch path (`torch_lora`) pays a fixed cost per op and per group of tokens (index_select, two bmm,
index_add_) that dwarfs the arithmetic of a decode step; the kernel walks the step's segments in one call.
Demo model, decode step of 32 tokens over 8 rank-16 adapters, all 28 LoRA layers, warm caches, 1 thread, 2-core
AMD EPYC: 0.5-0.6 ms against 1.5-2.0 ms for the torch path (loadtest/RESULTS.md has the cold-cache figures).

It is compiled on first use with torch's extension loader (needs a C++ compiler and ninja; about 25 s on an
idle 2-core machine) for this machine's CPU (`-march=native`), and cached under `$LORADOCK_CACHE_DIR` or the
user cache directory (`cpu-lora/`), one build per kernel source, torch version and CPU. When it cannot be
built, or the operands do not suit it (not float32, or another memory layout), the torch path serves instead:
the build failure is logged once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

import torch
from platformdirs import user_cache_dir

from .operands import LoraOperands
from .torch_lora import lora_torch

if TYPE_CHECKING:
    from .metadata import LoraBatchMeta, Segment

log = logging.getLogger("loradock.kernels")

SOURCE = Path(__file__).with_name("cpu_lora.cpp")
# Segments from this many tokens up (prefill chunks) go through torch's BLAS, one matmul pair each: it beats the
# kernel there (512-token prefill, rank 16, 256 -> 688: 0.18 ms against 0.30), the kernel wins below (32 tokens:
# 0.015 against 0.017 ms at rank 16; decode steps of many adapters by 2-3x).
LONG_SEGMENT = 64
CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: at::parallel_for runs in parallel (torch's libgomp)

_lock = threading.Lock()
_built: dict[str, ModuleType | None] = {}  # "kernel": the module, or None when the build failed


def cpu_kernel() -> ModuleType | None:
    """The compiled kernel, building it the first time (blocks ~25 s); None when it cannot be built."""
    if "kernel" not in _built:
        with _lock:
            if "kernel" not in _built:
                _built["kernel"] = _build()
    return _built["kernel"]


def build_directory() -> Path:
    """Where this machine's build lives: one per kernel source, torch version and CPU (its flags)."""
    cpu = platform.machine() + _cpu_flags()
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(cpu.encode() + source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    root = os.environ.get("LORADOCK_CACHE_DIR") or user_cache_dir("loradock")  # the demo model's cache root too
    return Path(root) / "cpu-lora" / f"torch-{torch.__version__}-{tag}"


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.processor())


def _build() -> ModuleType | None:
    from torch.utils.cpp_extension import load

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):
        log.info("building the CPU LoRA kernel (once per machine, about half a minute) in %s", directory)
    try:
        return load(
            name="loradock_cpu_lora",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
        )
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a failed compile: the torch path still works
        log.warning("the CPU LoRA kernel could not be built, using the slower torch path: %s", error)
        return None


def lora_cpu(y: torch.Tensor, x: torch.Tensor, ops: LoraOperands, meta: LoraBatchMeta) -> None:
    """y += scale * x A^T B^T per token's slot, through the kernel when it is built and suits the operands.

    y: [T, out_total] (rows may be strided); x: [T, in]; ops, meta: as for `lora_torch` (CPU tensors).
    The kernel takes float32 weights laid out with A's in and B's out innermost (`ops.cpu_kernel_layout`) and
    x, y with unit column stride; anything else goes to the torch path.
    """
    kernel = cpu_kernel()
    if kernel is None or not ops.cpu_kernel_layout or x.stride(1) != 1 or y.stride(1) != 1:
        lora_torch(y, x, ops, meta)
        return
    plan = meta.cpu_plan
    if plan.long:  # prefill-sized segments: one matmul pair each through torch's BLAS
        lora_torch(y, x, ops, meta, strategy="loop", segments=plan.long)
    if plan.num_short:
        kernel.lora_apply(
            y, x, ops.A, ops.B, ops.scales, ops.ranks, meta.sorted_tokens, plan.slots, plan.starts, plan.lengths,
            plan.num_short, ops.offsets, ops.sizes,
        )


class CpuPlan(NamedTuple):
    """A step's segments split between torch's BLAS (long ones) and the kernel (the rest, as its arrays)."""

    long: tuple[Segment, ...]  # segments of at least LONG_SEGMENT tokens
    slots: torch.Tensor  # [num_short] int32: the kernel's segments (all the others)
    starts: torch.Tensor  # [num_short] int32
    lengths: torch.Tensor  # [num_short] int32
    num_short: int


def plan_cpu(segments: tuple[Segment, ...]) -> CpuPlan:
    """Split a step's segments (`meta.cpu_plan` calls this once per step)."""
    long = tuple(segment for segment in segments if segment.length >= LONG_SEGMENT)
    short = [segment for segment in segments if segment.length < LONG_SEGMENT]
    columns = torch.tensor([[s.slot, s.start, s.length] for s in short], dtype=torch.int32).view(-1, 3)
    return CpuPlan(long, *columns.T.contiguous(), len(short))  # [3, num_short]: one contiguous row per field
