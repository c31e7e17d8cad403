"""Gathered-LoRA ops: one dispatch point, `apply_lora_operands` (`apply_lora` over it), to Triton or torch.

    meta = build_lora_meta(token_slots, max_slots)          # once per step; None: no token uses an adapter
    apply_lora(y, x, A, B, scales, ranks, meta)             # per LoRA layer, y += the adapters' deltas
    apply_lora(qkv, x, A_qkv, B_qkv, scales_qkv, ranks_qkv, meta, slice_sizes=(q, k, v))   # fused slices
    A, B = slot_buffers(S, R, in_features, out_features, dtype, device)   # a layer's buffers, once
    ops = lora_operands(A, B, scales, ranks)                # weights checked once (a layer, at construction)
    apply_lora_operands(y, x, ops, meta)                    # then per call: only x and y are checked

Backend: Triton for CUDA tensors, the torch path otherwise; LORADOCK_LORA_BACKEND=triton|torch forces one
(Triton on CPU tensors needs TRITON_INTERPRET=1, set before the first Triton use). Triton is imported only
when used, so this package imports on any machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .metadata import LoraBatchMeta, Segment, build_lora_meta
from .operands import LoraOperands, check_activations, lora_operands
from .reference import lora_reference
from .torch_lora import lora_torch

__all__ = [
    "LoraBatchMeta",
    "LoraOperands",
    "Segment",
    "apply_lora",
    "apply_lora_operands",
    "build_lora_meta",
    "lora_backend",
    "lora_operands",
    "lora_reference",
    "lora_torch",
    "slot_buffers",
]

BACKEND_ENV = "LORADOCK_LORA_BACKEND"


def lora_backend(device: torch.device) -> str:
    """'triton' or 'torch': the forced backend from LORADOCK_LORA_BACKEND, else triton on CUDA, torch elsewhere."""
    forced = os.environ.get(BACKEND_ENV)
    if not forced:
        return "triton" if device.type == "cuda" else "torch"
    forced = forced.strip().lower()
    if forced not in ("triton", "torch"):
        raise ValueError(f"{BACKEND_ENV} must be 'triton' or 'torch', got {forced!r}")
    return forced


def slot_buffers(
    num_slots: int, max_rank: int, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed slot buffers A [S, R, in] and B [S, out, R], stored rank-outermost ([R, S, in] and [R, S, out]).

    A step reads the first r rank planes of the slots it uses: one compact region whatever R (max_lora_rank) is,
    with in / out innermost for the kernels' tiles. Measured on the torch path (demo model, 32 rank-16 adapters,
    LoRA time per decode forward at 1 thread): 4.6 ms with R = 64 and 4.5 with R = 16, where slot-major storage
    ([S, R, in], [S, out, R]) takes 6.8 and 4.7-5.4, and rank-innermost A ([S, in, R]) 8.0 and 4.1. (Adapter
    weights are cold in the caches there; a cache-hot microbenchmark ranks layouts differently.)
    """
    A = torch.zeros(max_rank, num_slots, in_features, dtype=dtype, device=device).transpose(0, 1)  # [S, R, in]
    B = torch.zeros(max_rank, num_slots, out_features, dtype=dtype, device=device).permute(1, 2, 0)  # [S, out, R]
    return A, B


def apply_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scales: torch.Tensor,
    ranks: torch.Tensor,
    meta: LoraBatchMeta | None,
    slice_sizes: Sequence[int] | None = None,
) -> None:
    """y += scale * x A^T B^T with each token's own adapter slot, in place; nothing when meta is None.

    y: [T, out_total] (may be a strided view); x: [T, in]; A: [S, R, in], or [n, S, R, in] for n fused slices
    sharing x; B: [S, out_total, R] (slices concatenated along out; any strides); scales: [S] or [n, S] float32;
    ranks: [S] or [n, S] int32 (weights beyond a slot's rank are ignored); meta: from `build_lora_meta`;
    slice_sizes: output columns per slice, summing to out_total (None: one slice). Checks every operand.
    """
    if meta is not None:
        apply_lora_operands(y, x, lora_operands(A, B, scales, ranks, slice_sizes), meta)


def apply_lora_operands(y: torch.Tensor, x: torch.Tensor, ops: LoraOperands, meta: LoraBatchMeta | None) -> None:
    """`apply_lora` with the weights checked once beforehand by `lora_operands` (LoRA layers, per call)."""
    if meta is None:
        return
    check_activations(y, x, ops)
    if lora_backend(y.device) == "torch":
        lora_torch(y, x, ops, meta)
        return
    try:
        from .triton_lora import lora_triton
    except ImportError as error:
        message = f"the Triton LoRA backend needs triton ({error}); set {BACKEND_ENV}=torch to go without"
        raise ImportError(message) from error
    lora_triton(y, x, ops, meta)
