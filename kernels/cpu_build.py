"""The compiled CPU ops (`cpu_ops.cpp`: the gathered-LoRA kernel of `cpu_lora.cpp`, the chunked linears of
`cpu_linear.cpp`, the fused layer ops of `cpu_fused.cpp`, the attention against the paged KV cache of
`cpu_attention.cpp` and the greedy tokens of `cpu_greedy.cpp`, each for float32 and bfloat16 tensors), built on
first use and cached.

They are compiled with torch's extension loader (needs a C++ compiler and ninja; about half a minute on an idle
2-core machine) for this machine's CPU (`-march=native`), and cached under `$LORADOCK_CACHE_DIR` or the user cache
directory (`cpu-ops/`), one build per source, torch version and CPU. When they cannot be built, the failure is
logged once and the torch paths serve instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch
import platformdirs

from .cpu_features import cpu_flags_line

log = logging.getLogger("loradock.kernels")

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_ops.cpp", "cpu_lora.cpp", "cpu_linear.cpp",
                                                      "cpu_fused.cpp", "cpu_attention.cpp", "cpu_greedy.cpp")]
# included by the sources: part of the build's key
HEADERS = [Path(__file__).with_name(name) for name in ("cpu_element.h", "cpu_helper.h", "cpu_linear.h")]
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the tensors' dtypes the compiled ops take
CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: at::parallel_for runs in parallel (torch's libgomp)
# "off": no helper thread; the LoRA kernel after each GEMM and every GEMM whole, on the engine thread
HELPER_ENV = "LORADOCK_CPU_LORA_HELPER"

_lock = threading.Lock()
_built: dict[str, ModuleType | None] = {}  # "ops": the module, or None when the build failed


def cpu_ops() -> ModuleType | None:
    """The compiled ops, building them the first time (blocks ~30 s); None when they cannot be built."""
    if "ops" not in _built:
        with _lock:
            if "ops" not in _built:
                _built["ops"] = _build()
    return _built["ops"]


def helper_has_a_core() -> bool:
    """Whether the compiled ops' helper thread (`cpu_helper.h`) gets a core of its own: torch's compute threads
    leave one free, and the helper is not turned off."""
    return os.environ.get(HELPER_ENV, "on") != "off" and torch.get_num_threads() < len(os.sched_getaffinity(0))


def cache_root() -> Path:
    """loradock's cache directory (the compiled ops, the demo model): $LORADOCK_CACHE_DIR, else the user cache."""
    return Path(os.environ.get("LORADOCK_CACHE_DIR") or platformdirs.user_cache_dir("loradock"))


def build_directory() -> Path:
    """Where this machine's build lives: one per source, torch version and CPU (its flags)."""
    digest = hashlib.sha256((platform.machine() + cpu_flags_line() + " ".join(CFLAGS)).encode())
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    return cache_root() / "cpu-ops" / f"torch-{torch.__version__}-{digest.hexdigest()[:16]}"


def _build() -> ModuleType | None:
    from torch.utils.cpp_extension import load

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob("*.so")):
        log.info("building the compiled CPU ops (once per machine, about half a minute) in %s", directory)
    try:
        return load(
            name="loradock_cpu_ops",
            sources=[str(source) for source in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
        )
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a failed compile: the torch paths still work
        log.warning("the compiled CPU ops could not be built, using the slower torch paths: %s", error)
        return None
