"""The CPU's flags as the kernel lists them (/proc/cpuinfo's `flags` line, `Features` on Arm)."""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags_line(cpuinfo: Path = CPUINFO) -> str:
    """The flags line of `cpuinfo` as written there; where there is none, the platform's processor name."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.processor())


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU's flags (amx_bf16, avx512_bf16, avx2, ...); empty where `cpuinfo` lists none."""
    _, colon, flags = cpu_flags_line(cpuinfo).partition(":")
    return frozenset(flags.split()) if colon else frozenset()
