"""The base model's bf16 linears on the CPU with their weights in oneDNN's own blocked layout, packed once at start.

`F.linear` on a bf16 CPU weight hands oneDNN a plain [out, in] matrix, and oneDNN reorders it into its blocked
layout (the one its AMX and AVX512-BF16 kernels read) on every call: for the few rows of a decode step the reorder
costs about as much as the product. Packing once removes it; results are bit-identical to `F.linear` (oneDNN runs
the same kernel on the same blocks). Figures: loadtest/RESULTS.md, "bf16 on a CPU with AMX (issue 29)".

float32 is left as it is: MKL's packed GEMM would keep a second copy of every weight, and the CPUs that serve in
float32 (those without bf16 instructions) are not the ones this is for.
"""

from __future__ import annotations

import os

import torch
from torch import nn

PACKED_DTYPES = (torch.bfloat16,)
PACKED_ENV = "LORADOCK_CPU_PACKED_WEIGHTS"  # "off": plain weights, F.linear (to measure what packing gives)


def packing_available() -> bool:
    """oneDNN is built into this torch and offers the packed linear ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """An `nn.Linear` (no gradients) whose weight lives packed in oneDNN's layout. `batch_rows` is the number of rows
    the layout is chosen for: the decode batch, the calls that matter most; any other count runs correctly."""

    def __init__(self, linear: nn.Linear, batch_rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # [out, in] as an opaque oneDNN tensor: a plain attribute, not a buffer, since state dicts and .to() cannot
        # carry it; the module stays on the CPU
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_rows)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as a plain [out, in] tensor: a copy, made on each read, for readers at load time."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module, batch_rows: int) -> int:
    """Replace every bf16 `nn.Linear` of a CPU model (the LoRA layers' bases and the output head included) by a
    PackedLinear; returns how many. A weight shared with another module (a head tied to the embeddings) is packed as a
    copy, the sharer keeps its own; any other weight is freed once its module is replaced."""
    if not packing_available() or os.environ.get(PACKED_ENV, "on") == "off":
        return 0
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in PACKED_DTYPES
    ]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child, batch_rows))
    return len(swaps)
