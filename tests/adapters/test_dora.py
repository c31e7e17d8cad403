"""DoRA's scale g = m / ‖W + s·B A‖ computed against the base, and the output it gives a LoRA layer's slot, against
PEFT's DoRA layer: on a base with biases (qwen2), plain and nf4.

On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its CPU kernel on the first forward pass, after
which peft's DoRA reads the repacked bytes as if they were not (its norm of W is then garbage). The nf4 oracle here
keeps the weights unpacked (`support.unpacked_nf4`); `test_a_repacked_nf4_weight_gives_the_same_scales` covers the other
layout."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from loradock.adapters.dora import with_dora_scales
from loradock.adapters.peft_format import (
    AdapterError,
    AdapterWeights,
    BaseModelInfo,
    LoraModuleWeights,
    read_adapter,
)
from loradock.serve.models.loader import load_model
from peft_adapters import PREFIX, write_adapter
from support import unpacked_nf4

CPU = torch.device("cpu")
DORA = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, rank_pattern={"down_proj": 3})


@pytest.fixture(scope="module")
def dora_adapter(model_dir, tmp_path_factory):
    model, _ = load_model(model_dir("qwen2"), "none", torch.float32, CPU)
    return write_adapter(model, tmp_path_factory.mktemp("dora") / "dora", LoraConfig(**DORA))


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_a_dora_slot_computes_what_peft_computes(model_dir, dora_adapter, quantize):
    base_model = unpacked_nf4(load_model(model_dir("qwen2"), quantize, torch.float32, CPU)[0])
    bases = linears(base_model)
    adapter = with_dora_scales(read_adapter(dora_adapter, BaseModelInfo.from_model(base_model)), bases)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), dora_adapter).eval()
    x = torch.randn(5, base_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    checked = 0
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or layer.in_features != x.shape[1]:
            continue
        module, base = adapter.modules[name.removeprefix(PREFIX)], bases[name.removeprefix(PREFIX)]
        with torch.no_grad():
            y = base(x)  # [5, out]: what the kernels start from, the base's bias in it
            delta = module.scale * (x @ module.A.T @ module.B.T)  # [5, out]
            shift = 0 if base.bias is None else (1 - module.dora_scale) * base.bias
            ours = module.dora_scale * (y + delta) + shift  # the slot's affine, as lora_layer fills it
            torch.testing.assert_close(ours, layer(x), rtol=1e-5, atol=1e-5, msg=name)
        checked += 1
    assert checked >= 10  # every layer's q/k/v/o, gate and up projections


def test_a_repacked_nf4_weight_gives_the_same_scales(model_dir, dora_adapter):
    base_model, _ = load_model(model_dir("qwen2"), "nf4", torch.float32, CPU)
    adapter = read_adapter(dora_adapter, BaseModelInfo.from_model(base_model))
    before = with_dora_scales(adapter, linears(base_model))
    with torch.inference_mode():
        base_model(torch.tensor([[1, 2, 3]]))  # where the CPU has AVX512-BF16, bitsandbytes repacks 4-bit weights here
    states = [getattr(module.weight, "quant_state", None) for module in linears(base_model).values()]
    if not any(getattr(state, "packing_format_for_cpu", False) for state in states):
        pytest.skip("bitsandbytes keeps its 4-bit layout on this CPU")
    after = with_dora_scales(adapter, linears(base_model))
    for name, module in before.modules.items():  # the repacked absmax is rounded to bfloat16
        torch.testing.assert_close(after.modules[name].dora_scale, module.dora_scale, rtol=2**-8, atol=0, msg=name)


def test_an_adapter_without_dora_is_returned_as_it_is(model_dir, tmp_path):
    base_model, _ = load_model(model_dir("qwen2"), "none", torch.float32, CPU)
    path = write_adapter(base_model, tmp_path / "plain", LoraConfig(r=4, target_modules=["q_proj"]))
    adapter = read_adapter(path, BaseModelInfo.from_model(base_model))
    assert with_dora_scales(adapter, dict(base_model.named_modules())) is adapter


def test_a_zero_row_of_w_plus_the_delta_is_refused():
    base = nn.Linear(6, 4)
    with torch.no_grad():
        base.weight[2] = 0
    module = LoraModuleWeights(A=torch.ones(2, 6), B=torch.zeros(4, 2), rank=2, scale=1.0, magnitude=torch.ones(4))
    with pytest.raises(AdapterError, match="not finite") as caught:
        adapter = AdapterWeights(name="a", path=None, modules={"proj": module}, max_rank=2, target_names=("proj",),
                                 nbytes=0, sha256="", config={})
        with_dora_scales(adapter, {"proj": base})
    assert caught.value.code == "non_finite"
