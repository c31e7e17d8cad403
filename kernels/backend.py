"""Which implementation of the gathered-LoRA op serves a device: Triton, the compiled CPU kernel or torch."""

from __future__ import annotations

import os

import torch

BACKEND_ENV = "LORADOCK_LORA_BACKEND"


def lora_backend(device: torch.device) -> str:
    """'triton', 'cpp' or 'torch': the forced backend from LORADOCK_LORA_BACKEND, else triton on CUDA, cpp on the
    CPU, torch elsewhere."""
    forced = os.environ.get(BACKEND_ENV)
    if not forced:
        return {"cuda": "triton", "cpu": "cpp"}.get(device.type, "torch")
    forced = forced.strip().lower()
    if forced not in ("triton", "cpp", "torch"):
        raise ValueError(f"{BACKEND_ENV} must be 'triton', 'cpp' or 'torch', got {forced!r}")
    if forced == "cpp" and device.type != "cpu":
        raise ValueError(f"{BACKEND_ENV}=cpp runs on the CPU only, not on {device.type}")
    return forced
