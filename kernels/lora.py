"""The gathered-LoRA op's public face: pick a backend once, then every LoRA layer calls it.

    backend = select_lora_backend(device)                       # at engine start; backend.prepare() builds it
    A, B = backend.slot_buffers(S, R, in_features, out_features, dtype, device)   # a layer's buffers, once
    ops = lora_operands(A, B, scales, ranks, affine)            # weights checked once (a layer, at construction)
    meta = LoraMeta(max_tokens, S, device)                      # allocated once
    meta.update(token_slots)                                    # once per step, in place
    y = backend.linear(base, x, ops, meta)                      # a LoRA layer's forward
    backend.add_lora(y, x, ops, meta)                           # y += LoRA(x), the op alone

Backends (`LoraBackend`): Triton on CUDA, the compiled CPU kernel on the CPU (the torch path where it cannot be
built or does not suit the operands), the torch path elsewhere; LORADOCK_LORA_BACKEND=triton|cpp|torch forces one
(Triton on CPU tensors needs TRITON_INTERPRET=1, set before the first Triton import; cpp takes CPU tensors only).
Triton is imported only when its backend is selected, so this package imports on any machine.
"""

from __future__ import annotations

import os

import torch

from .backend import LoraBackend
from .cpu_lora import CpuBackend
from .metadata import LoraMeta, Segment
from .operands import LoraOperands, OutputAffine, lora_operands
from .reference import lora_reference
from .torch_lora import TorchBackend

BACKEND_ENV = "LORADOCK_LORA_BACKEND"

__all__ = [
    "BACKEND_ENV",
    "LoraBackend",
    "LoraMeta",
    "LoraOperands",
    "OutputAffine",
    "Segment",
    "lora_operands",
    "lora_reference",
    "select_lora_backend",
]


def select_lora_backend(device: torch.device) -> LoraBackend:
    """The backend for `device`: LORADOCK_LORA_BACKEND if set, else Triton on CUDA, cpp on the CPU, torch elsewhere."""
    name = (os.environ.get(BACKEND_ENV) or {"cuda": "triton", "cpu": "cpp"}.get(device.type, "torch")).strip().lower()
    if name == "torch":
        return TorchBackend()
    if name == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{BACKEND_ENV}=cpp runs on the CPU only, not on {device.type}")
        return CpuBackend()
    if name == "triton":
        try:
            from .triton_lora import TritonBackend
        except ImportError as error:
            message = f"the Triton LoRA backend needs triton ({error}); set {BACKEND_ENV}=torch to go without"
            raise ImportError(message) from error
        return TritonBackend()
    raise ValueError(f"{BACKEND_ENV} must be 'triton', 'cpp' or 'torch', got {name!r}")
