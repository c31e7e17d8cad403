"""The Triton kernels, interpreted on the CPU everywhere (fp32), compiled for real where there is a CUDA device."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from triton_support import triton_modules

TRITON_TARGETS = [
    "interpreted",
    pytest.param("compiled", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@dataclass(frozen=True)
class TritonTarget:
    lora: object  # loradock.kernels.triton_lora, its kernels interpreted or compiled
    device: str  # where the operands live


@pytest.fixture(scope="module", params=TRITON_TARGETS)
def triton(request):
    """The Triton kernels (LoRA, paged decode attention) interpreted on the CPU, or compiled on CUDA."""
    pytest.importorskip("triton")
    interpret = request.param == "interpreted"
    yield TritonTarget(triton_modules(interpret)["triton_lora"], "cpu" if interpret else "cuda")
    if interpret and torch.cuda.is_available():
        triton_modules(False)  # the engine's CUDA tests want compiled kernels
