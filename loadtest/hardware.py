"""Names the hardware and software a benchmark ran on, so every printed figure says where it came from."""

from __future__ import annotations

import os
import platform

import torch
import transformers

from ..kernels.cpu_features import cpu_flags
from ..serve.models.dtype import choose_dtype

# the CPU flags that decide loradock's dtype and kernels: bfloat16 matrix instructions, vector widths
NOTABLE_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma", "asimd", "bf16")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else whatever the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_hardware(device: torch.device) -> dict[str, str]:
    """CPU (model and notable flags), cores, torch threads, current load, GPU (if `device` is CUDA), the server's
    default dtype there and library versions, as strings."""
    info = {
        "cpu": cpu_model(),
        "cpu_flags": " ".join(flag for flag in NOTABLE_FLAGS if flag in cpu_flags()) or "none notable",
        "cpu_cores": f"{len(os.sched_getaffinity(0))} usable of {os.cpu_count()} logical",
        "torch_threads": str(torch.get_num_threads()),
        # other work on the machine skews CPU timings badly: a load near the core count means a busy host
        "load_average_1m": f"{os.getloadavg()[0]:.2f}",
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    info["dtype_auto"] = str(choose_dtype("auto", device))
    info |= {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return info


def format_hardware(info: dict[str, str]) -> str:
    """One `key: value` line per entry."""
    width = max(map(len, info))
    return "\n".join(f"{key:<{width}}  {value}" for key, value in info.items())
