"""Runs one engine step through the HF model: requests in, next-token logits out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...kernels.cpu_build import KERNEL_DTYPES, cpu_ops
from .attention import ATTENTION_NAME
from .batch import StepBatch, build_step, is_decode, step_rows
from .forward_context import ForwardContext
from .graph_runner import DecodeGraphs
from .request import Request


def cpu_cached_attention(device: torch.device, dtype: torch.dtype) -> Callable | None:
    """The compiled attention against the cache when the engine runs on the CPU in a dtype it takes (float32,
    bfloat16) and the CPU ops build, else None."""
    if device.type != "cpu" or dtype not in KERNEL_DTYPES:
        return None
    compiled = cpu_ops()
    return compiled.cached_attention if compiled is not None else None


@dataclass
class StepResult:
    """A step's next-token logits and what they belong to."""

    logits: torch.Tensor  # [N + P, vocab]: the N sampled rows, then the P prompt rows
    sampled: list[Request]  # the requests due a token, in the order of the logits' rows
    prompt_rows: list[tuple[Request, int]]  # (request, prompt position) of the prompt rows
    num_tokens: int  # tokens the step ran (padding excluded)


class ModelRunner:
    """Runs a step: from the decode graphs when every entry is a decode and a bucket holds them, else eagerly from a
    flat batch built for the step; both through the one forward context."""

    def __init__(
        self,
        model: torch.nn.Module,
        context: ForwardContext,
        device: torch.device,
        decode_graphs: DecodeGraphs | None = None,
    ):
        model.set_attn_implementation(ATTENTION_NAME)
        self.model = model
        self.context = context
        self.device = device
        self.decode_graphs = decode_graphs
        self.attention_kernel = cpu_cached_attention(device, context.kv_cache.shape.dtype)

    @torch.inference_mode()
    def run(self, entries: list[tuple[Request, int]]) -> StepResult:
        """entries: (request, tokens to run)."""
        graphs = self.decode_graphs
        if graphs is not None and graphs.bucket(len(entries)) is not None and all(is_decode(r, n) for r, n in entries):
            rows = step_rows(entries)  # every decode is sampled: rows 0..B-1, the graph's
            logits = graphs.run(rows.sampled)
        else:
            step = build_step(entries, self.context.kv_cache, self.device, self.attention_kernel)
            rows = step.rows
            logits = self._run_eager(step)
        return StepResult(logits, rows.sampled, rows.prompt_rows, sum(n for _, n in entries))

    def _run_eager(self, step: StepBatch) -> torch.Tensor:
        """The step's logits [N + P, vocab]: its LoRA metadata (the tokens', the logits rows') written in place, then
        the model over its flat batch."""
        context = self.context
        if context.lora is not None:
            context.lora.update(step.adapter_slots)
        if context.lora_rows is not None:  # the output head runs on the logits rows alone
            context.lora_rows.update([step.adapter_slots[row] for row in step.rows.indices])
        return context.forward(self.model, step.attention, step.input_ids, step.position_ids,
                               logits_to_keep=step.logits_rows)
