"""Loading the base model and its tokenizer from a local directory, quantized or not. Never downloads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

log = logging.getLogger("loradock.model")

Quantize = Literal["nf4", "int8", "none"]
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma")


class ModelLoadError(ValueError):
    """The model cannot be loaded; the message says why and what to do."""


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA device")
    if resolved.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device must be cpu or cuda, not {device!r}")
    return resolved


def default_quantize(device: torch.device) -> Quantize:
    return "nf4" if device.type == "cuda" else "none"


def default_dtype(device: torch.device) -> torch.dtype:
    """The trainer's compute dtype: bf16 on CUDA, fp32 on the CPU (the server's is `dtype.choose_dtype`'s)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def quantization_config(quantize: Quantize, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_storage=torch.uint8,
        )
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize == "none":
        return None
    raise ModelLoadError(f"--quantize must be nf4, int8 or none, not {quantize!r}")


def load_model(
    path: Path, quantize: Quantize, dtype: torch.dtype, device: torch.device
) -> tuple[torch.nn.Module, AutoTokenizer]:
    """The model in eval mode on `device`, and its tokenizer. Quantization goes through bitsandbytes."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        log.warning(
            "model type %r is not among the tested architectures %s; trying it anyway",
            config.model_type,
            ", ".join(SUPPORTED_ARCHITECTURES),
        )
    if getattr(config, "attn_logit_softcapping", None):
        raise ModelLoadError(f"{config.model_type}: attention logit soft-capping is not supported")
    log.info("loading %s (%s) on %s, quantize=%s, dtype=%s", path, config.model_type, device, quantize, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        local_files_only=True,
        dtype=dtype,
        quantization_config=quantization_config(quantize, dtype),
        device_map={"": device},
    )
    model.eval()
    return model, load_tokenizer(path)


def load_tokenizer(path: Path) -> AutoTokenizer:
    """The model's tokenizer alone (the ingress of engine replicas tokenizes without the model)."""
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def eos_ids(model: torch.nn.Module, tokenizer) -> frozenset[int]:
    """The token ids generation stops on: the generation config's EOS ids and the tokenizer's. The server stops on
    them and the trainer trains them, so train and serve agree."""
    ids = set()
    generation = getattr(model, "generation_config", None)
    for value in (getattr(generation, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)
