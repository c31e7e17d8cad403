"""The Triton launches as torch operators (`torch.ops.loradock.*`): one op per kernel launch, so traces, profilers
and the graph-safety checks see a launch as one operation on its tensors, not the launcher's Python.

Each implementation finds its Triton module when called, not when registered: the tests reload those modules to
switch between interpreted and compiled kernels, and an operator is registered once per process.
"""

from __future__ import annotations

import importlib

import torch

_library = torch.library.Library("loradock", "DEF")
_library.define(
    "lora_shrink(Tensor x, Tensor A, Tensor(a!) buf, Tensor ranks, Tensor sorted_tokens, Tensor segment_slots, "
    "Tensor segment_starts, Tensor segment_lengths, int split_k) -> ()"
)
_library.define(
    "lora_expand(Tensor(a!) y, Tensor buf, Tensor B, Tensor scales, Tensor ranks, Tensor sorted_tokens, "
    "Tensor segment_slots, Tensor segment_starts, Tensor segment_lengths, Tensor? out_scale=None, "
    "Tensor? out_shift=None, Tensor? out_mapped=None) -> ()"
)
_library.define(
    "paged_decode(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
    "Tensor context_lens, int block_size, float scale, int window) -> ()"
)


def _module(name: str):
    return importlib.import_module(f"loradock.kernels.{name}")


def _lora_shrink(x, A, buf, ranks, sorted_tokens, segment_slots, segment_starts, segment_lengths, split_k):
    _module("triton_lora").launch_shrink(x, A, buf, ranks, sorted_tokens, segment_slots, segment_starts,
                                         segment_lengths, split_k)


def _lora_expand(y, buf, B, scales, ranks, sorted_tokens, segment_slots, segment_starts, segment_lengths,
                 out_scale=None, out_shift=None, out_mapped=None):
    _module("triton_lora").launch_expand(y, buf, B, scales, ranks, sorted_tokens, segment_slots, segment_starts,
                                         segment_lengths, out_scale, out_shift, out_mapped)


def _paged_decode(out, q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window):
    _module("triton_attention").paged_decode_triton(out, q, k_cache, v_cache, block_tables, context_lens, block_size,
                                                    scale, window)


_library.impl("lora_shrink", _lora_shrink, "CompositeExplicitAutograd")
_library.impl("lora_expand", _lora_expand, "CompositeExplicitAutograd")
_library.impl("paged_decode", _paged_decode, "CompositeExplicitAutograd")

lora_shrink = torch.ops.loradock.lora_shrink
lora_expand = torch.ops.loradock.lora_expand
paged_decode = torch.ops.loradock.paged_decode
