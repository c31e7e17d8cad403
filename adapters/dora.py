"""DoRA's per-output scale, computed once per adapter against the base weights it will run on.

PEFT's DoRA linear (peft/tuners/lora/dora.py) outputs base(x) + (g − 1) ⊙ (x Wᵀ) + g ⊙ s·(x Aᵀ Bᵀ) with
    g = m / ‖W + s·B A‖        (the L2 norm of each output row over in_features, detached)
where m is the adapter's lora_magnitude_vector and W the base weight, dequantized when the base is bitsandbytes
4-bit or 8-bit. g depends only on the adapter and the base, so it is computed here when the adapter is read (in the
reader pool, off the engine thread), in float32, and the LoRA layer keeps it in its slot buffers.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .errors import AdapterError
from .peft_format import AdapterWeights, LoraModuleWeights, module_bytes


def with_dora_scales(weights: AdapterWeights, bases: dict[str, nn.Module]) -> AdapterWeights:
    """`weights` with the `dora_scale` g of each DoRA module computed against its base linear in `bases` (by full
    module name; a module without one is never served here); the adapter itself when it is not DoRA. AdapterError
    (non_finite) where a row of W + s·B A is zero."""
    if not any(module.magnitude is not None for module in weights.modules.values()):
        return weights
    modules = {
        name: replace(module, dora_scale=_dora_scale(module, bases[name], name))
        if module.magnitude is not None and name in bases else module
        for name, module in weights.modules.items()
    }
    return replace(weights, modules=modules, nbytes=sum(module_bytes(m) for m in modules.values()))


def _dora_scale(module: LoraModuleWeights, base: nn.Module, name: str) -> torch.Tensor:
    """g = m / ‖W + s·B A‖ per output row: [out] float32 on the CPU."""
    with torch.no_grad():
        weight = base_weight(base).float()  # [out, in], on the base's device
        device = weight.device
        lora = module.B.to(device, torch.float32) @ module.A.to(device, torch.float32)  # [out, in]
        norm = torch.linalg.norm(weight + module.scale * lora, dim=1)  # [out]
        scale = module.magnitude.to(device, torch.float32) / norm  # [out]
    if not torch.isfinite(scale).all():
        raise AdapterError(f"{name}: DoRA's scale m / ‖W + s·B A‖ is not finite (a row of W + s·B A is zero)",
                           "non_finite")
    return scale.cpu()


def base_weight(base: nn.Module) -> torch.Tensor:
    """A base linear's weight [out, in] as it computes with it: bitsandbytes 4-bit and 8-bit weights dequantized
    into a new tensor, the module left as it is (the engine thread may be running it)."""
    weight = base.weight
    kind = type(weight).__name__
    if kind not in ("Params4bit", "Int8Params"):
        return weight
    if kind == "Params4bit" and getattr(weight.quant_state, "packing_format_for_cpu", False):
        return _unpack_cpu_4bit(weight.data, weight.quant_state)
    from peft.utils.integrations import dequantize_bnb_weight  # bitsandbytes: only for quantized bases

    return dequantize_bnb_weight(weight, getattr(base, "state", None))


def _unpack_cpu_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """The weight [out, in] of a 4-bit linear that bitsandbytes repacked for its AVX512-BF16 CPU kernel (on the first
    forward pass: `functional._convert_weight_packed_for_cpu`), without undoing the packing in place as its inverse
    does. packed: [out, in / 2] uint8, each row of 32-column blocks holding the low nibbles of 32 codes, then the
    high ones; state.absmax: [in / blocksize, out] bfloat16; state.code: the 16 values a code stands for."""
    out_features, half = packed.shape
    nibbles = packed.reshape(-1, 32)  # [out * in / 64, 32]
    codes = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1)  # [out * in / 64, 64]
    codes = codes.reshape(out_features // 32, half, 32, 2).transpose(1, 2).reshape(out_features, 2 * half)  # [out, in]
    absmax = state.absmax.T.float().repeat_interleave(state.blocksize, dim=1)  # [out, in]
    return state.code[codes.long()] * absmax
