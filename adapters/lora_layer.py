"""The LoRA layer: a base linear (plain or bitsandbytes) plus per-slot adapter weights applied per token.

Every targeted linear of the base model is replaced by a LoraLinear that owns preallocated, stacked slot
buffers `A[slots, r_max, in]`, `B[slots, out, r_max]`, `scales[slots]` and `ranks[slots]`, laid out as the LoRA
backend reads them fastest. Loading an adapter into a slot is a copy into those buffers; no shapes change. Which
slot each token uses comes from the step's LoraMeta, shared by every layer through the LoraContext, which also holds
the one backend chosen at engine start. The LoraMeta is one object for the engine's life, rewritten in place once
per step on every path; the LoraContext is frozen: nothing is swapped into it between calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.lora import LoraBackend, LoraMeta, lora_operands


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
        self.operands = lora_operands(self.lora_A, self.lora_B, self.scales, self.ranks)  # checked once, here

    def _apply(self, fn, recurse=True):  # .to() and friends replace the buffers: the operands follow them
        super()._apply(fn, recurse)
        self.operands = lora_operands(self.lora_A, self.lora_B, self.scales, self.ranks)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        context = self.context
        if not context.meta.active:  # no token of this step uses an adapter
            return self.base(x)
        return context.backend.linear(self.base, x, self.operands, context.meta)

    def load_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float) -> None:
        """Copy one adapter's weights for this module into `slot`; A: [r, in], B: [out, r]. None clears the slot."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if A is None:
            self.scales[slot] = 0.0
            self.ranks[slot] = 0
            return
        rank = A.shape[0]
        self.lora_A[slot, :rank].copy_(A, non_blocking=True)
        self.lora_B[slot, :, :rank].copy_(B, non_blocking=True)
        self.scales[slot] = scale
        self.ranks[slot] = rank


def attach_lora_layers(model: nn.Module, module_names: list[str], context: LoraContext, num_slots: int,
                       max_rank: int, dtype: torch.dtype) -> dict[str, LoraLinear]:
    """Replace each named linear of `model` by a LoraLinear around it, sharing `context`. Returns the layers."""
    layers: dict[str, LoraLinear] = {}
    for name in module_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoraLinear(getattr(parent, child), context, num_slots, max_rank, dtype)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers
