"""The model to train: the base loaded as the server loads it (bitsandbytes nf4/int8 or plain), LoRA on top.

Targets are resolved against the base before training, with the server's own view of which layers an adapter may
adapt (``BaseModelInfo``: every linear layer but the output head), so a name that matches nothing, or the head,
fails here rather than after hours of training or at load time in the server.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.peft_format import BaseModelInfo
from ..serve.models.loader import default_dtype, default_quantize, eos_ids, load_model, resolve_device

log = logging.getLogger("loradock.train")

ALL_LINEAR = "all-linear"


@dataclass
class TrainableModel:
    """The LoRA-wrapped model and what export and data encoding need to know about its base."""

    model: torch.nn.Module  # a peft PeftModelForCausalLM
    tokenizer: object
    base_info: BaseModelInfo  # taken before LoRA wrapped any layer
    stop_ids: frozenset[int]  # token ids the server stops generation on
    targets: list[str]  # resolved short names of the adapted linear layers
    quantize: str
    dtype: torch.dtype
    device: torch.device


def training_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK under torchrun / accelerate launch, else as the server picks."""
    device = resolve_device(None)
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def resolve_targets(spec: str, base: BaseModelInfo) -> list[str]:
    """"all-linear" or comma-separated short names (q_proj,v_proj) -> sorted short names, each of which must name
    at least one linear layer the server can adapt."""
    available = sorted({name.rsplit(".", 1)[-1] for name in base.linear_modules})
    if spec.strip().lower() == ALL_LINEAR:
        return available
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    if not wanted:
        raise ValueError("--targets is empty: give all-linear or names like q_proj,v_proj")
    heads = {name.rsplit(".", 1)[-1] for name in base.vocab_modules}
    for name in wanted:
        if name in heads:
            raise ValueError(f"--targets {name}: loradock train adapts linear layers only, not the embeddings or the "
                             f"output head")
        if name not in available:
            raise ValueError(f"--targets {name} names no linear layer of this model; its linear layers are: "
                             f"{', '.join(available)}")
    return sorted(set(wanted))


def load_trainable(
    model_path: Path, quantize: str | None, targets: str, rank: int, alpha: float, dropout: float,
    gradient_checkpointing: bool, dora: bool = False,
) -> TrainableModel:
    """Load the base on this process's device, quantized as asked (default as the server: nf4 on CUDA, none on
    CPU), and wrap the target layers in trainable LoRA, or DoRA (bias none, nothing else trainable)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    device = training_device()
    quantize = quantize or default_quantize(device)
    dtype = default_dtype(device)
    model, tokenizer = load_model(model_path, quantize, dtype, device)
    base_info = BaseModelInfo.from_model(model)
    resolved = resolve_targets(targets, base_info)
    stop_ids = eos_ids(model, tokenizer)  # the very ids the server stops on
    model.config.use_cache = False
    if quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=resolved, bias="none", use_dora=dora,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)  # LoRA A starts random: the caller seeds torch first
    trainable, total = model.get_nb_trainable_parameters()
    log.info("%s r=%d on %s: %d trainable parameters of %d", "DoRA" if dora else "LoRA", rank, ",".join(resolved),
             trainable, total)
    return TrainableModel(model, tokenizer, base_info, stop_ids, resolved, quantize, dtype, device)
