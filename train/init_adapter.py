"""Training on from an existing adapter (--init-adapter, e.g. DPO after SFT): the base loaded as the server loads
it, the adapter on top with its own rank, alpha, dropout and targets, trainable.

The adapter is first checked with the server's own validation against this base, so an adapter for another model
fails here, before training, with the server's message.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters.peft_format import BaseModelInfo, read_adapter
from ..serve.models.loader import default_dtype, default_quantize, eos_ids, load_model
from .model import TrainableModel, training_device

_ANY_RANK = 1 << 12  # the rank limit for the check: the server's --max-lora-rank is checked at export


def load_from_adapter(model_path: Path, adapter: Path, quantize: str | None,
                      gradient_checkpointing: bool) -> TrainableModel:
    """The base on this process's device, quantized as asked (default as the server), with `adapter` trainable."""
    from peft import PeftModel, prepare_model_for_kbit_training
    from peft.tuners.lora import LoraLayer

    device = training_device()
    quantize = quantize or default_quantize(device)
    dtype = default_dtype(device)
    model, tokenizer = load_model(model_path, quantize, dtype, device)
    base_info = BaseModelInfo.from_model(model)
    read_adapter(adapter, base_info, max_rank=_ANY_RANK)
    stop_ids = eos_ids(model, tokenizer)  # the very ids the server stops on
    model.config.use_cache = False
    if quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    targets = sorted({name.rsplit(".", 1)[-1] for name, layer in model.named_modules() if isinstance(layer, LoraLayer)})
    return TrainableModel(model, tokenizer, base_info, stop_ids, targets, quantize, dtype, device)
