"""Runs one engine step through the HF model: requests in, next-token logits out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...adapters.lora_layer import LoraContext
from ...kernels.cpu_build import cpu_ops
from .attention import ATTENTION_NAME
from .batch import build_step
from .graph_runner import DecodeGraphs
from .kv_cache import PagedKVCache
from .request import Request


def cpu_decode_attention(device: torch.device, dtype: torch.dtype) -> Callable | None:
    """The compiled decode attention when the engine runs float32 on the CPU and the CPU ops build, else None."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    compiled = cpu_ops()
    return compiled.decode_attention if compiled is not None else None


@dataclass
class StepResult:
    """A step's next-token logits and what they belong to."""

    logits: torch.Tensor  # [N + P, vocab]: the N sampled rows, then the P prompt rows
    sampled: list[Request]  # the requests due a token, in the order of the logits' rows
    prompt_rows: list[tuple[Request, int]]  # (request, prompt position) of the prompt rows
    num_tokens: int  # tokens the step ran (padding excluded)


class ModelRunner:
    """Runs a step: from the decode graphs when every entry is a decode token and a bucket holds them, else eagerly
    from a flat batch built for the step."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        device: torch.device,
        lora: LoraContext | None = None,
        decode_graphs: DecodeGraphs | None = None,
    ):
        model.set_attn_implementation(ATTENTION_NAME)
        self.model = model
        self.cache = cache
        self.device = device
        self.lora = lora
        self.eager_meta = lora.meta if lora is not None else None
        self.decode_graphs = decode_graphs
        self.decode_kernel = cpu_decode_attention(device, cache.shape.dtype)

    def run(self, entries: list[tuple[Request, int]]) -> StepResult:
        """entries: (request, tokens to run)."""
        requests = [request for request, n in entries]
        graphs = self.decode_graphs
        if (
            graphs is not None
            and all(n == 1 and request.num_computed + 1 == request.num_tokens for request, n in entries)
            and graphs.bucket(len(entries)) is not None
        ):
            return StepResult(graphs.run(requests), requests, [], len(requests))
        return self._run_eager(entries)

    @torch.inference_mode()
    def _run_eager(self, entries: list[tuple[Request, int]]) -> StepResult:
        step = build_step(entries, self.cache, self.device, self.decode_kernel)
        if self.lora is not None:
            self.lora.meta = self.eager_meta
            self.eager_meta.update(step.adapter_slots)
        output = self.model(
            input_ids=step.input_ids,
            position_ids=step.position_ids,
            use_cache=False,
            logits_to_keep=step.logits_rows,
            loradock_step=step,
        )
        return StepResult(output.logits[0], step.sampled, step.prompt_rows, step.input_ids.shape[1])
