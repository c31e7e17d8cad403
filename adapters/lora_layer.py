"""The LoRA layer: a base linear (plain or bitsandbytes) plus per-slot adapter weights applied per token.

Every targeted linear of the base model is replaced by a LoraLinear that owns preallocated, stacked slot
buffers `A[slots, r_max, in]`, `B[slots, out, r_max]`, `scales[slots]` and `ranks[slots]`, laid out as the LoRA
backend reads them fastest, and the output affine's `out_scale[slots, out]`, `out_shift[slots, out]` and
`out_mapped[slots]` for DoRA and lora_bias slots: the kernels map such a slot's rows,
y = out_scale ⊙ (y + Δ) + out_shift; plain slots leave them unread. Loading an adapter into a slot is a copy into
those buffers; no shapes change.

PEFT computes a DoRA module's output as g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + bias with g = m / ‖W + s·B A‖ per output row
(`dora.py`), and a lora_bias module's as x Wᵀ + bias + s·(x Aᵀ Bᵀ + b). The kernels start from y = x Wᵀ + bias, so
a DoRA slot holds out_scale = g and out_shift = (1 − g) ⊙ bias, a lora_bias slot out_scale = 1 and out_shift = s·b.

Which slot each token uses comes from the step's LoraMeta, shared by every layer through the LoraContext, which also
holds the one backend chosen at engine start. The output head runs on the rows whose logits the step computes alone,
so its LoraLinear is given a LoraContext whose LoraMeta groups those rows. The LoraMeta is one object for the engine's life, rewritten in place
once per step on every path; the LoraContext is frozen: nothing is swapped into it between calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.lora import LoraBackend, LoraMeta, LoraOperands, OutputAffine, lora_operands
from ..kernels.packed_linear import run_linears


@dataclass(frozen=True)
class LoraContext:
    """Shared by all LoRA layers of a model: the backend, and the step's metadata (rewritten in place each step)."""

    backend: LoraBackend
    meta: LoraMeta


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, context: LoraContext, num_slots: int, max_rank: int, dtype: torch.dtype):
        super().__init__()
        self.base = base
        self.context = context
        device = next(base.parameters()).device
        self.in_features, self.out_features = base.in_features, base.out_features
        A, B = context.backend.slot_buffers(num_slots, max_rank, self.in_features, self.out_features, dtype, device)
        self.register_buffer("lora_A", A)  # [S, R, in]
        self.register_buffer("lora_B", B)  # [S, out, R]
        self.register_buffer("scales", torch.zeros(num_slots, dtype=torch.float32, device=device))
        self.register_buffer("ranks", torch.zeros(num_slots, dtype=torch.int32, device=device))
        affine_shape = (num_slots, self.out_features)
        self.register_buffer("out_scale", torch.ones(affine_shape, dtype=torch.float32, device=device))  # [S, out]
        self.register_buffer("out_shift", torch.zeros(affine_shape, dtype=torch.float32, device=device))  # [S, out]
        self.register_buffer("out_mapped", torch.zeros(num_slots, dtype=torch.int32, device=device))  # [S]
        self.operands = self._operands()  # checked once, here

    def _operands(self) -> LoraOperands:
        affine = OutputAffine(self.out_scale, self.out_shift, self.out_mapped)
        return lora_operands(self.lora_A, self.lora_B, self.scales, self.ranks, affine)

    def _apply(self, fn, recurse=True):  # .to() and friends replace the buffers: the operands follow them
        super()._apply(fn, recurse)
        self.operands = self._operands()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        context = self.context
        if not context.meta.active:  # no token of this step uses an adapter
            return self.base(x)
        return context.backend.linear(self.base, x, self.operands, context.meta)

    def load_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float,
                  dora_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        """Copy one adapter's weights for this module into `slot`; A: [r, in], B: [out, r]; a DoRA module's
        dora_scale g [out] float32, or a lora_bias module's bias b [out] (never both: peft refuses them together).
        A None clears the slot."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.out_scale[slot].fill_(1.0)
        self.out_shift[slot].zero_()
        self.out_mapped[slot] = 0
        if A is None:
            self.scales[slot] = 0.0
            self.ranks[slot] = 0
            return
        rank = A.shape[0]
        self.lora_A[slot, :rank].copy_(A, non_blocking=True)
        self.lora_B[slot, :, :rank].copy_(B, non_blocking=True)
        self.scales[slot] = scale
        self.ranks[slot] = rank
        if dora_scale is not None:
            g = dora_scale.to(self.out_scale.device)  # [out] float32
            self.out_scale[slot].copy_(g)
            if self.base.bias is not None:  # y holds the base's bias, which DoRA leaves unscaled
                self.out_shift[slot].copy_((1 - g) * self.base.bias.float())
        elif bias is not None:
            self.out_shift[slot].copy_(scale * bias.float())
        self.out_mapped[slot] = int(dora_scale is not None or bias is not None)


def run_lora_linears(modules: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Each module applied to x [T, in] (a decoder layer's q, k and v projections): LoRA layers of one context in one
    backend call (`LoraBackend.linear_group`), or their bases together in a step without adapters
    (`packed_linear.run_linears`); any other group one by one."""
    if not all(type(module) is LoraLinear for module in modules):
        return run_linears(modules, x)
    context = modules[0].context
    if any(module.context is not context for module in modules):
        return [module(x) for module in modules]
    if not context.meta.active:  # no token of this step uses an adapter
        return run_linears([module.base for module in modules], x)
    return context.backend.linear_group([module.base for module in modules], x,
                                        [module.operands for module in modules], context.meta)
