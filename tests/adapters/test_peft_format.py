"""Reading PEFT LoRA adapters: what real peft writes reads back exactly, and every refusal has its code.

Adapters are written by peft itself (get_peft_model + save_pretrained) on the tiny llama, with random non-zero
A and B (peft initialises B to zero); refusals edit a saved adapter or use the peft option that causes them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from transformers import AutoModelForCausalLM, LlamaConfig

from loradock.adapters.peft_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    BaseModelInfo,
    _parse_config,
    read_adapter,
)
from loradock.serve.models.loader import SUPPORTED_ARCHITECTURES, load_model
from peft_adapters import PREFIX, Q0, V1, edit_config, edit_tensors, write_adapter

CPU = torch.device("cpu")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base_model(model_dir):
    model, _ = load_model(model_dir("llama"), "none", torch.float32, CPU)
    return model


@pytest.fixture(scope="module")
def base(base_model) -> BaseModelInfo:
    return BaseModelInfo.from_model(base_model)


@pytest.fixture(scope="module")
def plain_adapter(base_model, tmp_path_factory):
    """r=4, alpha=8 on q_proj and v_proj of both layers: the adapter the refusal tests edit."""
    path = tmp_path_factory.mktemp("plain") / "plain"
    write_adapter(base_model, path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return path


@pytest.fixture
def adapter(plain_adapter, tmp_path):
    """A fresh copy of the plain adapter, free to edit."""
    return shutil.copytree(plain_adapter, tmp_path / "adapter")


def refused(path, base, code, *words, **kwargs) -> AdapterError:
    """read_adapter refuses with `code`, and its message holds each of `words`."""
    with pytest.raises(AdapterError) as caught:
        read_adapter(path, base, **kwargs)
    assert caught.value.code == code, str(caught.value)
    for word in words:
        assert word in str(caught.value)
    return caught.value


# ---- valid adapters read back as peft loads them -----------------------------------------------------------

VALID = {
    "plain": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rank_and_alpha_patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        # first match in order wins; a key may be a suffix, a full name or a regex
        rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 12, "model.layers.0.mlp.down_proj": 6},
        alpha_pattern={"layers.0.mlp.*": 5, "o_proj": 3, "mlp.up_proj": 7},
    ),
    "subset_q_v": dict(r=4, target_modules=["q_proj", "v_proj"]),
    "all_linear": dict(r=4, lora_alpha=32, target_modules="all-linear"),
    "regex": dict(r=4, target_modules=r".*layers\.1\..*_proj"),
    "layers_to_transform": dict(r=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    "layers_pattern": dict(r=4, target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers"),
    "exclude_modules": dict(r=4, target_modules="all-linear", exclude_modules=["down_proj", "k_proj"]),
}


@pytest.mark.parametrize("case", VALID)
def test_a_peft_adapter_reads_back_as_peft_loads_it(base_model, base, tmp_path, case):
    write_adapter(base_model, tmp_path / case, LoraConfig(**VALID[case]))
    adapter = read_adapter(tmp_path / case, base)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / case)

    layers = {
        name.removeprefix(PREFIX): layer for name, layer in peft_model.named_modules() if isinstance(layer, LoraLayer)
    }
    assert list(adapter.modules) == list(layers)  # the same modules, in the base model's order
    for name, layer in layers.items():
        module = adapter.modules[name]
        assert torch.equal(module.A, layer.lora_A["default"].weight)  # [r, in]
        assert torch.equal(module.B, layer.lora_B["default"].weight)  # [out, r]
        assert module.rank == layer.r["default"]
        assert module.scale == layer.scaling["default"]
    assert adapter.name == case and adapter.path == tmp_path / case
    assert adapter.max_rank == max(layer.r["default"] for layer in layers.values())
    assert adapter.target_names == tuple(sorted({name.rsplit(".", 1)[-1] for name in layers}))
    assert adapter.nbytes == sum(m.A.nbytes + m.B.nbytes for m in adapter.modules.values())
    assert adapter.sha256 == hashlib.sha256((tmp_path / case / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert adapter.config == json.loads((tmp_path / case / CONFIG_FILE).read_text())


def test_peft_writes_all_linear_as_full_module_names(base_model, base, tmp_path):
    write_adapter(base_model, tmp_path / "a", LoraConfig(r=4, target_modules="all-linear"))
    config = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert sorted(config["target_modules"]) == sorted(base.linear_modules)  # every linear layer but lm_head
    assert "lm_head" not in base.linear_modules and {"lm_head", "model.embed_tokens"} == base.vocab_modules


def test_peft_writes_all_linear_of_20_modules_or_more_as_suffixes(tmp_path):
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=100,
    )
    model = AutoModelForCausalLM.from_config(config)  # 21 linear layers besides lm_head
    base = BaseModelInfo.from_model(model)
    excluded = "model.layers.2.mlp.down_proj"
    write_adapter(model, tmp_path / "a", LoraConfig(r=2, target_modules="all-linear", exclude_modules=[excluded]))
    saved = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["target_modules"]
    assert sorted(saved) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert list(read_adapter(tmp_path / "a", base).modules) == [m for m in base.linear_modules if m != excluded]


def test_rslora_scale_is_alpha_over_sqrt_rank(base_model, base, tmp_path):
    config = LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
    write_adapter(base_model, tmp_path / "a", config)
    assert read_adapter(tmp_path / "a", base).modules[Q0].scale == 8 / math.sqrt(16)


def test_tensors_keep_the_file_dtype_and_own_their_memory(adapter, base):
    edit_tensors(adapter, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    read = read_adapter(adapter, base, name="custom")
    A = read.modules[Q0].A.clone()
    with open(adapter / WEIGHTS_FILE, "r+b") as file:  # rewritten in place: tensors must not be views of it
        file.write(bytes(len(file.read())))
    assert read.name == "custom" and A.dtype == torch.bfloat16
    assert torch.equal(read.modules[Q0].A, A) and A.abs().sum() > 0


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_base_model_info_of_each_architecture(model_dir, architecture):
    model, _ = load_model(model_dir(architecture), "none", torch.float32, CPU)
    base = BaseModelInfo.from_model(model)
    assert base.model_type == architecture and base.vocab_modules == {"model.embed_tokens", "lm_head"}
    assert base.embeddings == {"model.embed_tokens"} and base.head == "lm_head"
    assert base.modules["model.embed_tokens"] == (len(model.model.embed_tokens.weight), 64)  # (vocab, dim)
    assert base.modules["lm_head"] == (64, len(model.model.embed_tokens.weight))  # (in, out)
    assert len(base.linear_modules) == 14 and base.linear_modules[V1] == (64, 32)
    assert {name.rsplit(".", 1)[-1] for name in base.linear_modules} == set(LINEAR_NAMES)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_quantized_base_has_the_same_linear_modules(model_dir, base, quantize):
    model, _ = load_model(model_dir("llama"), quantize, torch.float32, CPU)
    assert BaseModelInfo.from_model(model) == base


# ---- the parsed config selects what peft's own config selects ------------------------------------------------

MATCHING = [
    dict(target_modules=["q_proj", "model.layers.1.mlp.up_proj"]),
    dict(target_modules=["self_attn.k_proj", "proj"]),  # "proj" is no suffix after a dot: matches nothing
    dict(target_modules=r".*\.(q|v)_proj"),
    dict(target_modules=r"q_proj"),  # a regex must match the whole name: nothing
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj", "model.layers.0.mlp.down_proj"], layers_to_transform=1),  # full names skip it
    dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=["blocks", "layers"]),
    dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"),  # pattern absent: nothing
    dict(target_modules=["q_proj"], layers_to_transform=[]),  # empty: every layer
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
    dict(target_modules=r".*_proj", exclude_modules=r".*mlp\..*"),
]


# Names from other model layouts: nested indices (MoE experts), other layer-list names, a bare name.
OTHER_NAMES = (
    "model.layers.1.mlp.experts.0.down_proj",
    "model.layers.0.mlp.experts.1.down_proj",
    "transformer.h.1.attn.q_proj",
    "blocks.0.q_proj",
    "model.blocks.1.self_attn.q_proj",
    "model.layers.1.block.layers.0.q_proj",
    "q_proj",
)


@pytest.mark.parametrize("kwargs", MATCHING)
def test_the_parsed_config_targets_what_peft_targets(base, kwargs):
    """The config as peft writes it to adapter_config.json, parsed by us (types checked and normalised), selects the
    same modules through peft's matching function as peft's own LoraConfig does."""
    theirs = LoraConfig(**kwargs)
    ours = _parse_config(json.loads(json.dumps(theirs.to_dict(), default=list)))
    for module in [*base.modules, *OTHER_NAMES]:
        assert bool(check_target_module_exists(ours, module)) == bool(check_target_module_exists(theirs, module)), module


# ---- refusals: one test each ---------------------------------------------------------------------------------


def test_not_lora(base_model, base, tmp_path):
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    write_adapter(base_model, tmp_path / "ia3", config)
    refused(tmp_path / "ia3", base, "not_lora", "'IA3'", "LoRA")


@pytest.mark.parametrize("option", ["use_dora", "lora_bias"])
def test_dora_and_lora_bias_read_back_as_peft_loads_them(base_model, base, tmp_path, option):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **{option: True})
    write_adapter(base_model, tmp_path / option, config)
    adapter = read_adapter(tmp_path / option, base)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / option)
    for name, layer in peft_model.named_modules():
        if isinstance(layer, LoraLayer):
            module = adapter.modules[name.removeprefix(PREFIX)]
            if option == "use_dora":
                assert torch.equal(module.magnitude, layer.lora_magnitude_vector["default"].weight)  # [out]
                assert module.bias is None
            else:
                assert torch.equal(module.bias, layer.lora_B["default"].bias)  # [out]
                assert module.magnitude is None
            assert module.dora_scale is None  # computed against the base when the server reads it
    assert adapter.nbytes == sum(m.A.nbytes + m.B.nbytes + (m.magnitude if m.bias is None else m.bias).nbytes
                                 for m in adapter.modules.values())


@pytest.mark.parametrize("option, part, code", [("use_dora", "lora_magnitude_vector", "dora"),
                                                ("lora_bias", "lora_B.bias", "bias")])
def test_dora_and_lora_bias_tensors_without_their_flag(base_model, base, tmp_path, option, part, code):
    write_adapter(base_model, tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"], **{option: True}))
    edit_config(tmp_path / "a", **{option: False})  # peft would drop the tensors silently
    refused(tmp_path / "a", base, code, f"{PREFIX}{Q0}.{part}", option)


@pytest.mark.parametrize("option, part", [("use_dora", "lora_magnitude_vector"), ("lora_bias", "lora_B.bias")])
def test_dora_and_lora_bias_flags_without_their_tensors(base_model, base, tmp_path, option, part):
    write_adapter(base_model, tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]))
    edit_config(tmp_path / "a", **{option: True})
    refused(tmp_path / "a", base, "missing_tensor", option, part, "model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("option, part", [("use_dora", "lora_magnitude_vector"), ("lora_bias", "lora_B.bias")])
def test_dora_and_lora_bias_vectors_of_the_wrong_shape_or_not_finite(base_model, base, tmp_path, option, part):
    write_adapter(base_model, tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"], **{option: True}))
    key = f"{PREFIX}{Q0}.{part}"
    edit_tensors(tmp_path / "a", lambda t: t.update({key: torch.ones(63)}))
    refused(tmp_path / "a", base, "shape_mismatch", key, "[63]", "[64]")
    edit_tensors(tmp_path / "a", lambda t: t.update({key: torch.ones(64, 1)}))
    refused(tmp_path / "a", base, "shape_mismatch", key, "[64, 1]")
    edit_tensors(tmp_path / "a", lambda t: t.update({key: torch.full((64,), math.nan)}))
    refused(tmp_path / "a", base, "non_finite", key, "64 non-finite")


def test_dora_with_lora_bias(base_model, base, tmp_path):
    write_adapter(base_model, tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    edit_config(tmp_path / "a", lora_bias=True)  # peft refuses the two together
    refused(tmp_path / "a", base, "bad_config", "use_dora and lora_bias")


def test_modules_to_save(base_model, base, tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    write_adapter(base_model, tmp_path / "mts", config)
    refused(tmp_path / "mts", base, "modules_to_save", "modules_to_save", "lm_head")


# ---- the embeddings and the output head ----------------------------------------------------------------------

EMBED = "model.embed_tokens"


@pytest.fixture(scope="module")
def vocab_adapter(base_model, tmp_path_factory):
    """r=4 on q_proj, the embeddings and the head, as peft saves it (with the base weights of the two)."""
    path = tmp_path_factory.mktemp("vocab") / "vocab"
    write_adapter(base_model, path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens", "lm_head"]))
    return path


@pytest.fixture
def vocab_copy(vocab_adapter, tmp_path):
    return shutil.copytree(vocab_adapter, tmp_path / "vocab")


def test_embedding_and_head_targets_read_back_as_peft_loads_them(base_model, base, vocab_adapter):
    adapter = read_adapter(vocab_adapter, base)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), vocab_adapter)
    embedding, head = peft_model.get_submodule(f"{PREFIX}{EMBED}"), peft_model.get_submodule(f"{PREFIX}lm_head")
    assert list(adapter.modules) == [EMBED, Q0, "model.layers.1.self_attn.q_proj", "lm_head"]
    assert torch.equal(adapter.modules[EMBED].A, embedding.lora_embedding_A["default"])  # [r, vocab]
    assert torch.equal(adapter.modules[EMBED].B, embedding.lora_embedding_B["default"])  # [dim, r]
    assert torch.equal(adapter.modules["lm_head"].A, head.lora_A["default"].weight)  # [r, dim]
    assert torch.equal(adapter.modules["lm_head"].B, head.lora_B["default"].weight)  # [vocab, r]
    assert adapter.modules[EMBED].scale == embedding.scaling["default"] == 2.0
    assert adapter.target_names == ("embed_tokens", "lm_head", "q_proj")
    # the base weights peft saved beside them are checked, not kept
    assert adapter.nbytes == sum(m.A.nbytes + m.B.nbytes for m in adapter.modules.values())


def test_all_linear_leaves_the_head_out(base_model, base, tmp_path):
    write_adapter(base_model, tmp_path / "a", LoraConfig(r=4, target_modules="all-linear"))
    assert set(read_adapter(tmp_path / "a", base).modules) == set(base.linear_modules)


@pytest.mark.parametrize("part, shape", [("lora_embedding_A", (4, 100)), ("lora_embedding_B", (64, 5)),
                                         ("base_layer.weight", (100, 64))])
def test_embedding_tensors_of_the_wrong_shape(base, vocab_copy, part, shape):
    key = f"{PREFIX}{EMBED}.{part}"
    edit_tensors(vocab_copy, lambda t: t.update({key: torch.ones(shape)}))
    refused(vocab_copy, base, "shape_mismatch", key, str(list(shape)))


def test_embedding_tensors_not_finite(base, vocab_copy):
    key = f"{PREFIX}{EMBED}.lora_embedding_A"
    edit_tensors(vocab_copy, lambda t: t[key].__setitem__((1, 7), math.inf))
    refused(vocab_copy, base, "non_finite", key, "1 non-finite")


def test_an_embedding_without_its_b(base, vocab_copy):
    edit_tensors(vocab_copy, lambda t: t.pop(f"{PREFIX}{EMBED}.lora_embedding_B"))
    refused(vocab_copy, base, "incomplete_pair", f"{PREFIX}{EMBED}.lora_embedding_A", "lora_B")


@pytest.mark.parametrize("key, moved", [(f"{EMBED}.lora_embedding_A", f"{EMBED}.lora_A.weight"),
                                        (f"{Q0}.lora_A.weight", f"{Q0}.lora_embedding_A"),
                                        ("lm_head.lora_A.weight", "lm_head.lora_embedding_A")])
def test_an_embedding_part_on_a_linear_or_the_reverse(base, vocab_copy, key, moved):
    edit_tensors(vocab_copy, lambda t: t.update({f"{PREFIX}{moved}": t.pop(f"{PREFIX}{key}")}))
    refused(vocab_copy, base, "unbound_tensor", f"{PREFIX}{moved}")


def test_a_base_weight_beside_a_linear_layer(base, vocab_copy):
    key = f"{PREFIX}{Q0}.base_layer.weight"
    edit_tensors(vocab_copy, lambda t: t.update({key: torch.ones(64, 64)}))
    refused(vocab_copy, base, "unbound_tensor", key, "linear layer")


def test_an_embedding_rank_above_the_limit(base, vocab_adapter):
    refused(vocab_adapter, base, "rank_too_large", "rank 4", "--max-lora-rank 4", max_rank=3)


@pytest.mark.parametrize("option, named", [(dict(use_dora=True), "use_dora"), (dict(lora_bias=True), "lora_bias"),
                                           (dict(ensure_weight_tying=True), "ensure_weight_tying")])
def test_embedding_options_not_served(base, vocab_copy, option, named):
    edit_config(vocab_copy, **option)
    refused(vocab_copy, base, "unsupported_feature", named)


@pytest.mark.parametrize(
    "option, named",
    [
        (dict(bias="lora_only"), "bias is 'lora_only'"),
        (dict(bias="all"), "bias is 'all'"),
    ],
)
def test_bias(base_model, base, tmp_path, option, named):
    write_adapter(base_model, tmp_path / "bias", LoraConfig(r=4, target_modules=["q_proj"], **option))
    refused(tmp_path / "bias", base, "bias", named, "not supported")


def test_pickle_weights(base_model, base, tmp_path):
    write_adapter(base_model, tmp_path / "bin", LoraConfig(r=4, target_modules=["q_proj"]), safe_serialization=False)
    assert not (tmp_path / "bin" / WEIGHTS_FILE).exists()
    refused(tmp_path / "bin", base, "pickle_weights", "adapter_model.bin", "never unpickles", "save_pretrained")


def test_missing_module_named_by_a_tensor(adapter, base):
    def to_layer_5(tensors):
        for key in [k for k in tensors if ".layers.1." in k]:
            tensors[key.replace(".layers.1.", ".layers.5.")] = tensors.pop(key)

    edit_tensors(adapter, to_layer_5)
    refused(adapter, base, "missing_module", "model.layers.5.self_attn.", "different model")


def test_missing_module_named_by_the_config(adapter, base):
    edit_config(adapter, target_modules=["c_attn", "c_proj"])
    refused(adapter, base, "missing_module", "c_attn", "q_proj")  # and what the base's layers are called


def test_shape_mismatch_with_the_base_module(adapter, base):
    edit_tensors(adapter, lambda t: t.update({f"{PREFIX}{Q0}.lora_A.weight": torch.ones(4, 32)}))
    refused(adapter, base, "shape_mismatch", f"{Q0}.lora_A.weight", "[4, 32]", "[4, 64]", "in_features=64")


def test_shape_mismatch_with_the_config_rank(adapter, base):
    edit_config(adapter, rank_pattern={"v_proj": 8})
    refused(adapter, base, "shape_mismatch", "v_proj", "rank 8")


def test_rank_too_large(base_model, base, tmp_path):
    config = LoraConfig(r=4, rank_pattern={"v_proj": 16}, target_modules=["q_proj", "v_proj"])
    write_adapter(base_model, tmp_path / "big", config)
    assert read_adapter(tmp_path / "big", base, max_rank=16).max_rank == 16
    refused(tmp_path / "big", base, "rank_too_large", "v_proj", "rank 16", "--max-lora-rank", max_rank=8)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite(adapter, base, value):
    def poison(tensors):
        tensors[f"{PREFIX}{V1}.lora_B.weight"][3, 1] = value

    edit_tensors(adapter, poison)
    refused(adapter, base, "non_finite", f"{V1}.lora_B.weight", "NaN or Inf")


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda t: t.update({"base_model.model.extra.weight": torch.ones(2)}), "base_model.model.extra.weight"),
        (lambda t: t.update({f"{PREFIX}{Q0}.lora_C.weight": torch.ones(2)}), f"{Q0}.lora_C.weight"),
        (lambda t: t.update({f"{Q0}.lora_A.weight": t.pop(f"{PREFIX}{Q0}.lora_A.weight")}), f"{Q0}.lora_A.weight"),
    ],
    ids=["stray", "unknown_suffix", "no_prefix"],
)
def test_unbound_tensor(adapter, base, edit, named):
    edit_tensors(adapter, edit)
    refused(adapter, base, "unbound_tensor", named, "not the lora_A/lora_B weights")


def test_unbound_tensor_of_a_module_the_config_does_not_target(adapter, base):
    edit_config(adapter, target_modules=["q_proj"])
    refused(adapter, base, "unbound_tensor", f"{V1}.lora_A.weight")


@pytest.mark.parametrize("name", ["Qwen/Qwen2-0.5B", "google/gemma-2b", "mistralai/Mixtral-8x7B-v0.1"])
def test_wrong_architecture_by_hub_id(adapter, base, name):
    edit_config(adapter, base_model_name_or_path=name)
    refused(adapter, base, "wrong_architecture", name, "'llama'")


def test_wrong_architecture_by_local_model_folder(adapter, base, model_dir):
    edit_config(adapter, base_model_name_or_path=str(model_dir("qwen2")))
    refused(adapter, base, "wrong_architecture", "'qwen2'", "'llama'")


@pytest.mark.parametrize(
    "name", ["meta-llama/Llama-3.2-1B", "TinyLlama/TinyLlama-1.1B", "my-org/my-model", "/no/such/dir", None]
)
def test_the_same_family_or_an_unknown_name_passes(adapter, base, name):
    edit_config(adapter, base_model_name_or_path=name)
    assert read_adapter(adapter, base).modules


def test_missing_files(adapter, base, tmp_path):
    refused(tmp_path / "nowhere", base, "missing_file", "not a directory")
    (adapter / WEIGHTS_FILE).unlink()
    refused(adapter, base, "missing_file", WEIGHTS_FILE)
    (adapter / CONFIG_FILE).unlink()
    refused(adapter, base, "missing_file", CONFIG_FILE)


def test_corrupt_file_at_any_truncation_or_as_garbage(adapter, base):
    data = (adapter / WEIGHTS_FILE).read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    huge = (2**63).to_bytes(8, "little") + data[8:]
    not_an_object = (8).to_bytes(8, "little") + b"[1, 2]  "
    bad_offsets = data[:8] + data[8:header].replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1) + data[header:]
    assert bad_offsets != data
    for cut in (0, 5, 8, 60, header - 1, header, header + 7, len(data) - 1):
        (adapter / WEIGHTS_FILE).write_bytes(data[:cut])
        refused(adapter, base, "corrupt_file", WEIGHTS_FILE)
    for blob in (bytes(range(256)) * 40, huge, not_an_object, bad_offsets, data + b"trailing"):
        (adapter / WEIGHTS_FILE).write_bytes(blob)
        refused(adapter, base, "corrupt_file", WEIGHTS_FILE)


def test_too_large(adapter, base):
    edit_tensors(adapter, lambda t: t.update({"base_model.model.merged.weight": torch.zeros(2048, 256)}))  # 2 MiB
    refused(adapter, base, "too_large", WEIGHTS_FILE, "merged model")


@pytest.mark.parametrize(
    "content, named",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object, not list"),
        (b'"LORA"', "JSON object, not str"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN, "target_modules": ["q_proj"]}', "lora_alpha"),
    ],
    ids=["syntax", "list", "string", "not_utf8", "nan"],
)
def test_bad_config_file(adapter, base, content, named):
    (adapter / CONFIG_FILE).write_bytes(content)
    refused(adapter, base, "bad_config", named)


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("r", "4", "r must be"),
        ("r", 0, "r must be"),
        ("r", -4, "r must be"),
        ("r", 4.0, "r must be"),
        ("r", True, "r must be"),
        ("lora_alpha", "8", "lora_alpha"),
        ("lora_alpha", None, "lora_alpha"),
        ("lora_alpha", 10**400, "lora_alpha"),
        ("use_rslora", "yes", "use_rslora"),
        ("target_modules", 5, "target_modules"),
        ("target_modules", [], "target_modules"),
        ("target_modules", "(unclosed", "regular expression"),
        ("rank_pattern", {"q_proj": 0}, "rank_pattern"),
        ("rank_pattern", [4], "rank_pattern"),
        ("alpha_pattern", {"q_proj": "x"}, "alpha_pattern"),
        ("layers_to_transform", "1", "layers_to_transform"),
        ("exclude_modules", {"a": 1}, "exclude_modules"),
        ("base_model_name_or_path", 5, "base_model_name_or_path"),
    ],
)
def test_bad_config_field(adapter, base, field, value, named):
    edit_config(adapter, **{field: value})
    refused(adapter, base, "bad_config", named)


def test_bad_dtype(adapter, base):
    edit_tensors(adapter, lambda t: t.update({f"{PREFIX}{Q0}.lora_A.weight": torch.ones(4, 64, dtype=torch.int32)}))
    refused(adapter, base, "bad_dtype", f"{Q0}.lora_A.weight", "I32")


@pytest.mark.parametrize("half, other", [("A", "B"), ("B", "A")])
def test_incomplete_pair(adapter, base, half, other):
    edit_tensors(adapter, lambda t: t.pop(f"{PREFIX}{V1}.lora_{other}.weight"))
    refused(adapter, base, "incomplete_pair", f"{V1}.lora_{half}.weight", f"no matching lora_{other}")


def test_missing_tensor(adapter, base):
    edit_tensors(adapter, lambda t: [t.pop(f"{PREFIX}{V1}.lora_{half}.weight") for half in "AB"])
    refused(adapter, base, "missing_tensor", f"targets {V1}")


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_qalora", True),
        ("alora_invocation_tokens", [5, 6]),
        ("layer_replication", [[0, 2]]),
        ("target_parameters", ["mlp.experts.gate_up_proj"]),
        ("init_lora_weights", "pissa_niter_4"),
        ("init_lora_weights", "loftq"),
    ],
)
def test_unsupported_feature(adapter, base, field, value):
    edit_config(adapter, **{field: value})
    refused(adapter, base, "unsupported_feature", field)


def test_the_message_starts_with_the_adapter_name(adapter, base):
    edit_config(adapter, peft_type="LOHA")
    assert str(refused(adapter, base, "not_lora", name="my-adapter")).startswith("adapter 'my-adapter': peft_type")
