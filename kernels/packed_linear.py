"""The base model's bf16 linears on the CPU with their weights in oneDNN's own blocked layout, packed once at start.

`F.linear` on a bf16 CPU weight hands oneDNN a plain [out, in] matrix, and oneDNN reorders it into its blocked
layout (the one its AMX and AVX512-BF16 kernels read) on every call: for the few rows of a decode step the reorder
costs about as much as the product. Packing once removes it; results are bit-identical to `F.linear` (oneDNN runs
the same kernel on the same blocks). Figures: loadtest/RESULTS.md, "bf16 on a CPU with AMX (issue 29)".

A weight is packed in chunks of its output rows where torch's compute threads leave a core to the compiled ops'
helper thread (`cpu_build`, `cpu_helper.h`): the engine thread and the helper each run some of the chunks' GEMMs.
A decode step's few rows make every GEMM wait on the weights coming from memory, and two cores read memory about
twice as fast as one. The chunks of one weight give exactly the columns the whole weight gives.

float32 is left as it is: MKL's packed GEMM would keep a second copy of every weight, and the CPUs that serve in
float32 (those without bf16 instructions) are not the ones this is for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from .cpu_build import cpu_ops

PACKED_DTYPES = (torch.bfloat16,)
PACKED_ENV = "LORADOCK_CPU_PACKED_WEIGHTS"  # "off": plain weights, F.linear (to measure what packing gives)
# Chunks of a split weight (loadtest/RESULTS.md, "Weights in chunks shared with the helper thread"): an even
# count, one or more per thread, since an odd one leaves a thread a chunk more; at most PAIR_ROWS rows per pair of
# chunks (the output head's 49152 rows go in four); none for a weight under SPLIT_ROWS rows, too short to share.
SPLIT_ROWS = 256
PAIR_ROWS = 24576


def chunk_count(out_features: int, split: bool) -> int:
    """How many chunks a weight of `out_features` rows is packed in: one unless `split` (a helper thread has a core)."""
    if not split or out_features < SPLIT_ROWS:
        return 1
    return 2 * -(-out_features // PAIR_ROWS)


def packing_available() -> bool:
    """oneDNN is built into this torch, offers the packed linear ops and runs them in bf16 on this CPU (it needs
    AVX512BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only CPU has neither)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """An `nn.Linear` (no gradients) whose weight lives packed in oneDNN's layout, in `chunks` pieces of its output
    rows. `batch_rows` is the number of rows the layout is chosen for: the decode batch, the calls that matter most;
    any other count runs correctly."""

    def __init__(self, linear: nn.Linear, batch_rows: int, chunks: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # [rows, in] each, as opaque oneDNN tensors: a plain attribute, not buffers, since state dicts and .to()
        # cannot carry them; the module stays on the CPU
        self.packed = [
            torch.ops.mkldnn._reorder_linear_weight(rows.contiguous(), batch_rows)
            for rows in linear.weight.detach().tensor_split(chunks)
        ]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as a plain [out, in] tensor: a copy, made on each read, for readers at load time."""
        return torch.cat([chunk.to_dense() for chunk in self.packed])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        compiled = cpu_ops()
        if compiled is None:
            biases = [None] * len(self.packed) if self.bias is None else self.bias.tensor_split(len(self.packed))
            return torch.cat([torch.ops.mkldnn._linear_pointwise(x, chunk, bias, "none", [], "")
                              for chunk, bias in zip(self.packed, biases)], dim=-1)
        y = compiled.linear_group(x.reshape(-1, self.in_features), [self.packed], [self.bias])[0]  # [T, out]
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def run_linears(linears: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Each linear applied to x [T, in]: packed ones in one call of the compiled ops, every chunk of the group a tile of
    one job shared with the helper thread (a decoder layer's k and v projections are too small to split alone, but
    not beside q); any other, one by one."""
    compiled = cpu_ops()
    if compiled is None or not all(type(linear) is PackedLinear for linear in linears):
        return [linear(x) for linear in linears]
    return compiled.linear_group(x, [linear.packed for linear in linears], [linear.bias for linear in linears])


def pack_linears(model: nn.Module, batch_rows: int, split: bool = False) -> int:
    """Replace every bf16 `nn.Linear` of a CPU model (the LoRA layers' bases and the output head included) by a
    PackedLinear, in chunks when `split` (see `chunk_count`); returns how many. A weight shared with another module (a
    head tied to the embeddings) is packed as a copy, the sharer keeps its own; any other weight is freed once its
    module is replaced."""
    if not packing_available() or os.environ.get(PACKED_ENV, "on") == "off":
        return 0
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype in PACKED_DTYPES
    ]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child, batch_rows, chunk_count(child.out_features, split)))
    return len(swaps)
