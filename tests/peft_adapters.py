"""Adapters written by real peft for the tests, and the edits that make them bad.

`write_adapter` saves what peft's own `get_peft_model` + `save_pretrained` write, every LoRA parameter seeded
random (peft starts B at zero, which would make an adapter a no-op). `edit_config` and `edit_tensors` change a
saved adapter in place; `BAD_ADAPTERS` makes one adapter for each refusal of the adapter checklist.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loradock.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE

PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"  # [in 64, out 64] in the tiny llama
V1 = "model.layers.1.self_attn.v_proj"  # [in 64, out 32] (two kv heads of 16)


def write_adapter(base_model, path, config, safe_serialization: bool = True) -> Path:
    """Save a real peft adapter for `config` (a peft config) into `path`, every LoRA parameter seeded random."""
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base_model), config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or "ia3_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    return Path(path)


def edit_config(path, **changes) -> None:
    config = json.loads((Path(path) / CONFIG_FILE).read_text())
    config.update(changes)
    (Path(path) / CONFIG_FILE).write_text(json.dumps(config))


def edit_tensors(path, edit: Callable[[dict], object]) -> None:
    tensors = load_file(Path(path) / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, Path(path) / WEIGHTS_FILE, metadata={"format": "pt"})


def _plain(base_model, path: Path) -> Path:
    from peft import LoraConfig

    return write_adapter(base_model, path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def _lora(**options):
    def build(base_model, path: Path) -> Path:
        from peft import LoraConfig

        return write_adapter(base_model, path, LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **options}))

    return build


def _without_flag(flag: str):
    """An adapter peft wrote with `flag` (use_dora, lora_bias), the flag then cleared in its config: its extra
    tensors (magnitude vectors, lora_B biases) come without it."""

    def build(base_model, path: Path) -> Path:
        _lora(**{flag: True})(base_model, path)
        edit_config(path, **{flag: False})
        return path

    return build


def _edited(config: dict | None = None, tensors: Callable[[dict], object] | None = None):
    def build(base_model, path: Path) -> Path:
        _plain(base_model, path)
        if config:
            edit_config(path, **config)
        if tensors:
            edit_tensors(path, tensors)
        return path

    return build


def _ia3(base_model, path: Path) -> Path:
    from peft import IA3Config

    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    return write_adapter(base_model, path, config)


def _bin_only(base_model, path: Path) -> Path:
    from peft import LoraConfig

    return write_adapter(base_model, path, LoraConfig(r=4, target_modules=["q_proj"]), safe_serialization=False)


def _missing_weights(base_model, path: Path) -> Path:
    _plain(base_model, path)
    (path / WEIGHTS_FILE).unlink()
    return path


def _truncated(base_model, path: Path) -> Path:
    _plain(base_model, path)
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    return path


def _poison(tensors: dict) -> None:
    tensors[f"{PREFIX}{V1}.lora_B.weight"][3, 1] = float("nan")


# refusal -> (builder(base_model, path), the AdapterError code). "rank_too_large" needs --max-lora-rank below 16.
BAD_ADAPTERS: dict[str, tuple[Callable[[object, Path], Path], str]] = {
    "not_lora": (_ia3, "not_lora"),
    "dora": (_without_flag("use_dora"), "dora"),
    "modules_to_save": (_lora(modules_to_save=["lm_head"]), "modules_to_save"),
    "no_slots": (_lora(target_modules=["q_proj", "embed_tokens"]), "no_slots"),  # a server of default targets
    "bias": (_lora(bias="all"), "bias"),
    "bin_only": (_bin_only, "pickle_weights"),
    "missing_target": (_edited(config={"target_modules": ["c_attn", "c_proj"]}), "missing_module"),
    "shape_mismatch": (_edited(tensors=lambda t: t.update({f"{PREFIX}{Q0}.lora_A.weight": torch.ones(4, 32)})),
                       "shape_mismatch"),
    "rank_too_large": (_lora(r=16), "rank_too_large"),
    "nan": (_edited(tensors=_poison), "non_finite"),
    "unbound_tensor": (_edited(tensors=lambda t: t.update({f"{PREFIX}extra.weight": torch.ones(2)})),
                       "unbound_tensor"),
    "other_architecture": (_edited(config={"base_model_name_or_path": "Qwen/Qwen2-0.5B"}), "wrong_architecture"),
    "missing_file": (_missing_weights, "missing_file"),
    "truncated": (_truncated, "corrupt_file"),
}


def copy_adapter(source: Path, target: Path) -> Path:
    return Path(shutil.copytree(source, target))
