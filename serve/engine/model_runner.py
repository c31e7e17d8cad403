"""Runs one engine step through the HF model: flat batch in, next-token logits out."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...adapters.lora_layer import LoraContext
from ...kernels.lora import build_lora_meta, cpu_ops
from .attention import ATTENTION_NAME
from .batch import StepBatch, build_step
from .kv_cache import PagedKVCache
from .request import Request


def cpu_decode_attention(device: torch.device, dtype: torch.dtype) -> Callable | None:
    """The compiled decode attention when the engine runs float32 on the CPU and the CPU ops build, else None."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    compiled = cpu_ops()
    return compiled.decode_attention if compiled is not None else None


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        device: torch.device,
        lora: LoraContext | None = None,
        num_slots: int = 0,
    ):
        model.set_attn_implementation(ATTENTION_NAME)
        self.model = model
        self.cache = cache
        self.device = device
        self.lora = lora
        self.num_slots = num_slots
        self.decode_kernel = cpu_decode_attention(device, cache.shape.dtype)

    @torch.inference_mode()
    def run(self, entries: list[tuple[Request, int]]) -> tuple[torch.Tensor, StepBatch]:
        """entries: (request, tokens to run). Returns logits [N, vocab] for `step.sampled`, and the step."""
        step = build_step(entries, self.cache, self.device, self.decode_kernel)
        if self.lora is not None:
            self.lora.meta = build_lora_meta(step.adapter_slots, self.num_slots, self.device)
        output = self.model(
            input_ids=step.input_ids,
            position_ids=step.position_ids,
            use_cache=False,
            logits_to_keep=step.logits_rows,
            loradock_step=step,
        )
        return output.logits[0], step  # [N, vocab]
