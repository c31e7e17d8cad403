"""The LoRA backend interface: one implementation of the gathered-LoRA op per kind of device.

    y[t] += scale[s] · (x[t] @ A[s, :r]ᵀ) @ B[s, :, :r]ᵀ     for every token t whose adapter slot s = slot(t) ≠ -1,
                                                             r = rank[s]
    y[t] = g[s] ⊙ y[t] + c[s]                                for those whose slot the output affine maps (DoRA,
                                                             lora_bias): its per-output scale g and shift c

Implementations: Triton (CUDA), the compiled CPU kernel, and the torch path (reference speed, any device). One
object is chosen when the engine starts (`lora.select_lora_backend`) and held by the LoRA context; every LoRA layer
calls it, so nothing on the hot path switches on a backend's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from .metadata import LoraMeta
from .operands import LoraOperands, check_activations


class LoraBackend:
    """How one device runs `y += LoRA(x)`: its slot-buffer layout, the op itself, and a LoRA layer's forward."""

    name: ClassVar[str]

    def prepare(self) -> None:
        """Build what the backend needs before the first step (the compiled CPU ops take about half a minute)."""

    def slot_buffers(
        self, num_slots: int, max_rank: int, in_features: int, out_features: int, dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed slot buffers A [S, R, in] and B [S, out, R], stored as this backend reads them fastest.

        Here rank-outermost, A stored [R, S, in] and B [R, S, out]: a step reads the first r rank planes of the
        slots it uses, one compact region whatever R (max_lora_rank) is, with in / out innermost for the tiles.
        """
        A = torch.zeros(max_rank, num_slots, in_features, dtype=dtype, device=device).transpose(0, 1)  # [S, R, in]
        B = torch.zeros(max_rank, num_slots, out_features, dtype=dtype, device=device).permute(1, 2, 0)  # [S, out, R]
        return A, B

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, ops: LoraOperands, meta: LoraMeta) -> None:
        """y += LoRA(x) per token's slot, in place. y: [T, out] (rows may be strided); x: [T, in], the weights'
        dtype; ops: checked weights (`lora_operands`); meta: the step's grouping. Checks x and y first."""
        check_activations(y, x, ops)
        if meta.active:
            self._add(y, x, ops, meta)

    def linear(self, base: torch.nn.Module, x: torch.Tensor, ops: LoraOperands, meta: LoraMeta) -> torch.Tensor:
        """A LoRA layer's forward: base(x) plus each token's adapter delta. x: [..., in] -> [..., out].

        The base runs, then `add_lora` (x cast to the adapters' dtype for the LoRA part: a bitsandbytes base
        computes in its own dtype)."""
        y = base(x)  # [..., out]
        x_2d = x.reshape(-1, x.shape[-1])  # [T, in]
        self.add_lora(y.view(-1, y.shape[-1]), x_2d if x_2d.dtype == ops.A.dtype else x_2d.to(ops.A.dtype), ops, meta)
        return y

    def linear_group(self, bases: Sequence[torch.nn.Module], x: torch.Tensor, operands: Sequence[LoraOperands],
                     meta: LoraMeta) -> list[torch.Tensor]:
        """The forwards of LoRA layers that read the same x (a decoder layer's q, k and v projections): each base
        with its operands, as `linear` gives them; a backend may run the group in one call."""
        return [self.linear(base, x, ops, meta) for base, ops in zip(bases, operands)]

    def _add(self, y: torch.Tensor, x: torch.Tensor, ops: LoraOperands, meta: LoraMeta) -> None:
        """`add_lora` once x and y are checked and some token uses an adapter."""
        raise NotImplementedError
