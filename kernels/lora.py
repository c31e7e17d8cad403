"""Gathered-LoRA ops: one dispatch point, `apply_lora_operands` (`apply_lora` over it), to Triton or torch.

    meta = build_lora_meta(token_slots, max_slots)          # once per step; None: no token uses an adapter
    apply_lora(y, x, A, B, scales, ranks, meta)             # per LoRA layer, y += the adapters' deltas
    apply_lora(qkv, x, A_qkv, B_qkv, scales_qkv, ranks_qkv, meta, slice_sizes=(q, k, v))   # fused slices
    A, B = slot_buffers(S, R, in_features, out_features, dtype, device)   # a layer's buffers, once
    ops = lora_operands(A, B, scales, ranks)                # weights checked once (a layer, at construction)
    apply_lora_operands(y, x, ops, meta)                    # then per call: only x and y are checked

Backend: Triton for CUDA tensors, the compiled CPU kernel (`cpu_lora`) for CPU ones (it falls back to the
torch path where it cannot be built or does not suit the operands), the torch path elsewhere;
LORADOCK_LORA_BACKEND=triton|cpp|torch forces one (Triton on CPU tensors needs TRITON_INTERPRET=1, set before
the first Triton use; cpp takes CPU tensors only).
`prepare_lora_backend(device)` builds what the device's backend needs up front (the CPU kernel's first build
takes about half a minute). Triton is imported only when used, so this package imports on any machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .backend import BACKEND_ENV, lora_backend
from .cpu_build import cpu_ops
from .cpu_lora import lora_cpu, lora_linear_cpu
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
    "cpu_ops",
    "linear_with_lora",
    "lora_backend",
    "lora_cpu",
    "lora_operands",
    "lora_reference",
    "lora_torch",
    "prepare_lora_backend",
    "slot_buffers",
]


def prepare_lora_backend(device: torch.device) -> str:
    """Build what `device`'s backend needs before the first step (the compiled CPU ops); returns the backend."""
    backend = lora_backend(device)
    if backend == "cpp":
        cpu_ops()
    return backend


def slot_buffers(
    num_slots: int, max_rank: int, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed slot buffers A [S, R, in] and B [S, out, R], stored as the device's backend reads them fastest.

    CPU (the compiled kernel): slot-major, A stored [S, R, in] and B [S, R, out], so the weights a slot's tokens
    read are one contiguous block each. The decode step of the demo model (32 tokens, 8 rank-16 adapters, all 28
    LoRA layers, caches flushed between steps, 1 thread): 1.19-1.56 ms slot-major, 1.43-1.75 rank-outermost.
    Elsewhere: rank-outermost, A stored [R, S, in] and B [R, S, out]: a step reads the first r rank planes of the
    slots it uses, one compact region whatever R (max_lora_rank) is, with in / out innermost for the kernels'
    tiles. Either way in / out are innermost.
    """
    if torch.device(device).type == "cpu":
        A = torch.zeros(num_slots, max_rank, in_features, dtype=dtype, device=device)  # [S, R, in]
        B = torch.zeros(num_slots, max_rank, out_features, dtype=dtype, device=device).transpose(1, 2)  # [S, out, R]
        return A, B
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


def linear_with_lora(
    base: torch.nn.Module, x: torch.Tensor, ops: LoraOperands, meta: LoraBatchMeta | None
) -> torch.Tensor:
    """base(x) plus each token's adapter delta: a LoRA layer's forward. x: [..., in] -> [..., out].

    On the compiled CPU backend, with a float32 `nn.Linear` base, the deltas are computed on a helper thread
    while the base GEMM runs (`lora_linear_cpu`); otherwise the base runs, then `apply_lora_operands` adds them
    (x cast to the adapters' dtype for the LoRA part).
    """
    if meta is None:  # no token of this step uses an adapter
        return base(x)
    x_2d = x.reshape(-1, x.shape[-1])  # [T, in]
    if meta.backend == "cpp":
        y = lora_linear_cpu(base, x_2d, ops, meta)
        if y is not None:
            return y.view(*x.shape[:-1], y.shape[-1])
    y = base(x)  # [..., out]
    x_lora = x_2d if x_2d.dtype == ops.A.dtype else x_2d.to(ops.A.dtype)
    apply_lora_operands(y.view(-1, y.shape[-1]), x_lora, ops, meta)
    return y


def apply_lora_operands(y: torch.Tensor, x: torch.Tensor, ops: LoraOperands, meta: LoraBatchMeta | None) -> None:
    """`apply_lora` with the weights checked once beforehand by `lora_operands` (LoRA layers, per call)."""
    if meta is None:
        return
    check_activations(y, x, ops)
    backend = meta.backend
    if backend == "cpp":
        lora_cpu(y, x, ops, meta)
        return
    if backend == "torch":
        lora_torch(y, x, ops, meta)
        return
    try:
        from .triton_lora import lora_triton
    except ImportError as error:
        message = f"the Triton LoRA backend needs triton ({error}); set {BACKEND_ENV}=torch to go without"
        raise ImportError(message) from error
    lora_triton(y, x, ops, meta)
