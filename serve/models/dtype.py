"""The engine's compute dtype: the one asked for, or with `auto` the one the hardware runs fastest (DESIGN.md,
principle 8): bfloat16 on CUDA and on CPUs with bfloat16 matrix instructions (AMX-BF16, AVX512-BF16), float32 on
other CPUs, where bfloat16 has no instructions of its own and runs several times slower than float32."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import torch

from ...kernels.cpu_features import cpu_flags

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_INSTRUCTIONS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))  # (CPU flag, name), best first


@dataclass(frozen=True)
class DtypeChoice:
    """A compute dtype and why it was chosen."""

    dtype: torch.dtype
    reason: str  # "the CPU has AMX-BF16", "asked for", ...

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def bf16_instructions(flags: Collection[str]) -> str | None:
    """The name of the best bfloat16 matrix instructions among the CPU's flags, or None when it has none."""
    return next((name for flag, name in BF16_INSTRUCTIONS if flag in flags), None)


def choose_dtype(asked: DtypeName, device: torch.device, flags: Collection[str] | None = None) -> DtypeChoice:
    """The dtype asked for, or for `auto` the hardware's: bfloat16 on CUDA and on a CPU whose flags (default: this
    machine's) include AMX-BF16 or AVX512-BF16, float32 on any other CPU."""
    if asked != "auto":
        return DtypeChoice(DTYPES[asked], "asked for")
    if device.type == "cuda":
        return DtypeChoice(torch.bfloat16, "on CUDA")
    found = bf16_instructions(cpu_flags() if flags is None else flags)
    if found is None:
        return DtypeChoice(torch.float32, "the CPU has no bf16 instructions")
    return DtypeChoice(torch.bfloat16, f"the CPU has {found}")
