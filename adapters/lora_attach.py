"""Which modules of the base model get LoRA slots, and the LoRA layers put in their place.

`--lora-target-modules` names them by short name; by default every linear layer but the output head (peft's
"all-linear"). The input embeddings and the output head get slots only when named: a slot there costs vocab × r_max
values. An adapter that adapts a module without slots is refused when read (the manager), never served in part.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import torch
from torch import nn

from .lora_embedding import LoraEmbedding
from .lora_layer import LoraContext, LoraLinear
from .peft_format import BaseModelInfo

LoraLayer = LoraLinear | LoraEmbedding


class SlotMemory(NamedTuple):
    """Bytes the LoRA layers' slot buffers take."""

    total: int
    affine: int  # of which the output affine's vectors (DoRA's scales, the shifts of DoRA and lora_bias)
    vocab: int  # of which the input embeddings' and the output head's layers


def slotted_modules(base: BaseModelInfo, targets: Collection[str] | None) -> list[str]:
    """The base modules that get LoRA slots, in the model's order: those whose short name is in `targets`, or every
    linear layer but the output head when None. ValueError for a name no module of the base has."""
    if targets is None:
        return list(base.linear_modules)
    short = {name: name.rsplit(".", 1)[-1] for name in base.modules}
    unknown = sorted(set(targets) - set(short.values()))
    if unknown:
        raise ValueError(f"--lora-target-modules names {', '.join(unknown)}, which the base model does not have; its "
                         f"targetable modules are {', '.join(sorted(set(short.values())))}")
    return [name for name in base.modules if short[name] in targets]


def attach_lora_layers(model: nn.Module, contexts: dict[str, LoraContext], num_slots: int, max_rank: int,
                       dtype: torch.dtype) -> dict[str, LoraLayer]:
    """Replace each named module of `model` (the keys of `contexts`) by a LoRA layer around it reading its context: a
    LoraEmbedding for an nn.Embedding, else a LoraLinear. Returns the layers."""
    layers: dict[str, LoraLayer] = {}
    for name, context in contexts.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        kind = LoraEmbedding if isinstance(module, nn.Embedding) else LoraLinear
        layer = kind(module, context, num_slots, max_rank, dtype)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def slot_memory(layers: dict[str, LoraLayer], vocab_modules: Collection[str]) -> SlotMemory:
    """Bytes the layers' own buffers take (their base modules' excluded)."""
    def size(layer: nn.Module, names: Collection[str] | None = None) -> int:
        return sum(buffer.numel() * buffer.element_size() for name, buffer in layer.named_buffers(recurse=False)
                   if names is None or name in names)

    total = sum(size(layer) for layer in layers.values())
    affine = sum(size(layer, ("out_scale", "out_shift", "out_mapped")) for layer in layers.values())
    vocab = sum(size(layer) for name, layer in layers.items() if name in vocab_modules)
    return SlotMemory(total, affine, vocab)
