"""Decode steps replayed from graphs captured per batch-size bucket, with and without adapter tokens.

    graphs = DecodeGraphs(model, context, inputs, CudaGraph)  # the ForwardContext, the persistent DecodeInputs
    graphs.capture()                                          # every bucket, largest first, one memory pool
    logits = graphs.run(requests)                             # [B, vocab]: fill the inputs, one copy, one replay

A step of B decode tokens runs the smallest bucket >= B (1, 2, 4, 8, then steps of 8 up to max-num-seqs); its
rows past B are padding (`DecodeInputs`). Host time per step is then the inputs' copy and one replay, whatever the
model's depth: HF's per-module Python, the kernel launchers and bitsandbytes' dispatch ran once, at capture. A graph
records the LoRA layers' kernels only if adapter tokens were present at capture, so each bucket has a graph with
them and one without. Adapter loads copy into the slot buffers the graphs read, on the same stream, between
replays. Prefill and mixed steps run eagerly.

`CudaGraph` records and replays a CUDA graph; `EagerGraph` stands in for it on the CPU: its replay runs the captured
function again into the captured output, so the runner's logic (buckets, padding, buffers read in place, output
slicing) is checked without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .decode_inputs import DecodeInputs
from .forward_context import ForwardContext
from .request import Request


def decode_buckets(max_seqs: int) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, 8, then steps of 8, up to and including max_seqs."""
    small = [size for size in (1, 2, 4, 8) if size < max_seqs]
    return small + list(range(16, max_seqs, 8)) + [max_seqs] if max_seqs > 8 else small + [max_seqs]


class CudaGraph:
    """One captured CUDA graph; every graph of a runner shares one memory pool."""

    def __init__(self, pool):
        self._graph = torch.cuda.CUDAGraph()
        self._pool = pool

    def capture(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.cuda.graph(self._graph, pool=self._pool):
            return forward()

    def replay(self) -> None:
        self._graph.replay()


class EagerGraph:
    """The CPU's stand-in for a CUDA graph: replay reruns the captured function into the captured output tensor."""

    def __init__(self, pool=None):
        self._forward: Callable[[], torch.Tensor] | None = None

    def capture(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        self._forward = forward
        self._output = forward()
        return self._output

    def replay(self) -> None:
        self._output.copy_(self._forward())


GraphFactory = Callable[[object], CudaGraph | EagerGraph]  # (memory pool) -> graph


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, context: ForwardContext, inputs: DecodeInputs, graph: GraphFactory,
                 pool=None):
        """context: the model's forward context, whose LoRA metadata is `inputs.lora_meta`."""
        self.model, self.context, self.inputs = model, context, inputs
        self.buckets = decode_buckets(inputs.max_seqs)
        self._attention = {bucket: inputs.attention(bucket) for bucket in self.buckets}  # made once, read in place
        self._graph, self._pool = graph, pool
        self._captured: dict[tuple[int, bool], tuple[CudaGraph | EagerGraph, torch.Tensor]] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, with and without adapter tokens, largest first (the smaller reuse its memory)."""
        variants = (False, True) if self.inputs.lora_meta is not None else (False,)
        for bucket in reversed(self.buckets):
            for adapters in variants:
                self._write_dummy(bucket, adapters)
                self.forward(bucket)  # warm up: lazy initialisation and kernel compilation stay out of the graph
                graph = self._graph(self._pool)
                self._captured[bucket, adapters] = (graph, graph.capture(lambda bucket=bucket: self.forward(bucket)))

    def bucket(self, batch: int) -> int | None:
        """The smallest bucket that holds `batch` decode tokens; None when larger than every bucket."""
        return next((size for size in self.buckets if size >= batch), None)

    @torch.inference_mode()
    def run(self, requests: list[Request]) -> torch.Tensor:
        """The next-token logits [B, vocab] of B decode requests (each due one token, its blocks allocated)."""
        bucket = self.bucket(len(requests))
        graph, logits = self._captured[bucket, self.inputs.write(requests, bucket)]
        graph.replay()
        return logits[: len(requests)]

    def forward(self, bucket: int) -> torch.Tensor:
        """The decode forward over the persistent inputs' first `bucket` rows: logits [bucket, vocab]."""
        inputs = self.inputs
        inputs.widen_slot_mapping(bucket)
        return self.context.forward(self.model, self._attention[bucket], inputs.input_ids[None, :bucket],
                                    inputs.positions[None, :bucket])

    def _write_dummy(self, bucket: int, adapters: bool) -> None:
        """Padding in every row, with adapter slot 0 for every row when `adapters`."""
        self.inputs.write([], bucket)
        if adapters:
            self.inputs.write_lora([0] * bucket)
            self.inputs.copy()
