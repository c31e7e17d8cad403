"""The decoder layers of a llama-style model in bfloat16 on the CPU, run by a lean forward over fused ops.

HF's decoder layer spends most of a decode step's non-GEMM time outside arithmetic: each RMSNorm is five ATen ops
and an allocation per op, the rotary embedding eight, the MLP's activation two, and every module call, hub-kernel
wrapper and keyword argument between them is Python. On a 2-core CPU serving a small model that is a third of the
step (loadtest/RESULTS.md, "Fused decoder layers"). The forward here runs the same computation from the layer's own
modules (its LoRA layers and packed linears included) with one compiled op (`kernels/cpu_fused.cpp`) for each
RMSNorm (the residual add fused into the second), for the rotary embedding of q and of k, and for silu(gate) * up,
runs q, k and v, and gate and up, as one call each (`run_lora_linears`: every GEMM chunk and LoRA tile of the group
one job for the engine thread and the helper), and writes and attends the KV cache as the registered attention
function does (`attention.attend_in_cache`).

The ops round to bfloat16 where HF's code does: rotary is bit-identical, the norms may differ in the last bit where
the variance's summation order does, the activation where the exponential's last bit does. So this runs in bfloat16
only, whose results are checked within a tolerance (PEFT in bfloat16 as the oracle); float32, checked token for
token against PEFT, keeps HF's forward. Architectures: llama, mistral, qwen2, qwen3 (its q/k norms included), with
SiLU MLPs and the full head dimension rotated; any other keeps HF's forward. LORADOCK_CPU_FUSED_LAYERS=off turns it
off (to compare).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import MethodType

import torch
from torch import nn

from ...adapters.lora_layer import run_lora_linears
from ...kernels.cpu_build import cpu_ops
from .attention import attend_in_cache

FUSED_ENV = "LORADOCK_CPU_FUSED_LAYERS"


def _no_window(attention: nn.Module) -> int | None:
    return None


# model type -> the attention layer's sliding window, as its HF forward passes it to the attention function
SLIDING_WINDOW: dict[str, Callable[[nn.Module], int | None]] = {
    "llama": _no_window,
    "mistral": lambda attention: getattr(attention.config, "sliding_window", None),
    "qwen2": lambda attention: attention.sliding_window,
    "qwen3": lambda attention: attention.sliding_window,
}


def fuse_decoder_layers(model: nn.Module) -> int:
    """Give each decoder layer and the final norm of a bfloat16 CPU model of a supported architecture the fused
    forward; returns the layers fused (0: the model keeps HF's forward)."""
    config = model.config
    parameter = next(model.parameters())
    if (
        os.environ.get(FUSED_ENV, "on") == "off"
        or parameter.device.type != "cpu"
        or parameter.dtype != torch.bfloat16
        or config.model_type not in SLIDING_WINDOW
        or getattr(config, "hidden_act", None) != "silu"
        or getattr(config, "partial_rotary_factor", 1.0) != 1.0
        or cpu_ops() is None
    ):
        return 0
    inner = model.model
    for layer in inner.layers:
        layer.forward = MethodType(_layer_forward, layer)
        layer.fused_window = SLIDING_WINDOW[config.model_type](layer.self_attn)
    inner.norm.forward = MethodType(_norm_forward, inner.norm)
    return len(inner.layers)


def _norm_forward(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:  # x: [..., C]
    return cpu_ops().rms_norm(x.reshape(-1, x.shape[-1]), norm.weight, norm.variance_epsilon).view(x.shape)


def _heads(x: torch.Tensor, head_dim: int, norm: nn.Module | None) -> torch.Tensor:
    """A projection's rows [T, heads * D] as [T, heads, D], each head RMS-normed where the layer has a norm for it
    (qwen3's q_norm and k_norm)."""
    tokens = x.shape[0]
    if norm is None:
        return x.view(tokens, -1, head_dim)
    return cpu_ops().rms_norm(x.reshape(-1, head_dim), norm.weight, norm.variance_epsilon).view(tokens, -1, head_dim)


def _layer_forward(
    layer: nn.Module,
    hidden_states: torch.Tensor,  # [1, T, C]
    position_embeddings: tuple[torch.Tensor, torch.Tensor],  # cos, sin [1, T, D]
    loradock_context=None,
    **_,
) -> torch.Tensor:  # [1, T, C]
    """HF's decoder layer: x + attention(norm(x)), then that + mlp(norm(that)), through the fused ops."""
    if loradock_context is None:
        raise RuntimeError("the fused decoder layers run only inside the loradock engine")
    ops = cpu_ops()
    attention, mlp = layer.self_attn, layer.mlp
    x = hidden_states[0]  # [T, C]
    h = ops.rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
    head_dim = attention.head_dim
    q, k, v = run_lora_linears((attention.q_proj, attention.k_proj, attention.v_proj), h)  # [T, (H or Hkv) * D]
    q = _heads(q, head_dim, getattr(attention, "q_norm", None))  # [T, H, D]
    k = _heads(k, head_dim, getattr(attention, "k_norm", None))  # [T, Hkv, D]
    v = v.view(x.shape[0], -1, head_dim)  # [T, Hkv, D]
    cos, sin = (part[0] for part in position_embeddings)  # [T, D]
    attended = attend_in_cache(loradock_context, attention.layer_idx, ops.rotary(q, cos, sin), ops.rotary(k, cos, sin),
                               v, attention.scaling, layer.fused_window)  # [T, H, D]
    norm = layer.post_attention_layernorm
    x, h = ops.add_rms_norm(attention.o_proj(attended.reshape(x.shape[0], -1)), x, norm.weight, norm.variance_epsilon)
    gate, up = run_lora_linears((mlp.gate_proj, mlp.up_proj), h)  # [T, I] each
    return (x + mlp.down_proj(ops.silu_and_mul(gate, up)))[None]
