"""The decode path of CUDA graphs, checked on the CPU: the graph runner with the eager step standing in for a graph
(`EagerGraph`) against PEFT, and the decode forward with the kernels as on CUDA (Triton, interpreted, through their
ops) under a TorchDispatchMode: no host syncs, no host-to-device copies, only persistent buffers read, and one op
sequence whatever the context lengths and the adapter mix within a bucket."""

from __future__ import annotations

import random

import pytest
import torch
from lora_workload import expected, mixed_workload, run_mixed
from support import CPU
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from triton_support import triton_modules

from loradock.kernels import custom_ops
from loradock.serve.engine import Engine, EngineConfig
from loradock.serve.engine.graph_runner import EagerGraph, decode_buckets
from loradock.serve.engine.request import Request
from loradock.serve.engine.sampling import SamplingParams
from loradock.serve.models.loader import load_model

# ops that make the host wait for the device (item, tolist, bool of a tensor, data-dependent shapes)
HOST_SYNCS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2",
              "aten.unique_consecutive", "aten.item"}


def test_buckets():
    assert decode_buckets(256) == [1, 2, 4, 8, *range(16, 257, 8)]
    assert decode_buckets(8) == [1, 2, 4, 8]
    assert decode_buckets(5) == [1, 2, 4, 5]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]


@pytest.fixture(scope="module")
def as_on_cuda():
    """The LoRA layers and the paged decode attention run the Triton kernels (interpreted) through their ops."""
    pytest.importorskip("triton")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORADOCK_LORA_BACKEND", "triton")
        triton_modules(interpret=True)
        patch.setattr("loradock.serve.engine.engine.select_paged_decode", lambda device: custom_ops.paged_decode)
        yield
    if torch.cuda.is_available():
        triton_modules(interpret=False)


def graph_engine(model_dir, adapter_dir, **config) -> Engine:
    model, tokenizer = load_model(model_dir("llama"), "none", torch.float32, CPU)
    config = EngineConfig(**{"adapters_dir": str(adapter_dir), "max_gpu_adapters": 4, "max_num_seqs": 8,
                             "max_model_len": 256, **config})
    return Engine(model, tokenizer, config, CPU, decode_graph=EagerGraph)


def test_graph_decode_equals_peft_with_mixed_adapters(model_dir, adapter_dir, tokenizer):
    workload = mixed_workload(tokenizer)[:8]
    engine = graph_engine(model_dir, adapter_dir).start()
    replays = []
    engine.runner.decode_graphs.run = _counting(engine.runner.decode_graphs.run, replays)
    try:
        assert run_mixed(engine, workload) == expected(model_dir, adapter_dir, workload)
    finally:
        engine.shutdown()
    assert len(replays) > 5  # the decode steps came from the graphs
    # the eager and the graph steps ran one forward context: every LoRA layer reads its one LoraMeta
    meta = engine.context.lora
    assert meta is engine.runner.decode_graphs.inputs.lora_meta
    assert all(layer.context.meta is meta for layer in engine.adapters.layers.values())


def test_an_adapter_swapped_between_replays(model_dir, adapter_dir, tokenizer):
    # one device slot: every adapter change copies new weights into the buffers the graph reads
    workload = [(name, prompt) for name, prompt in mixed_workload(tokenizer) if name is not None][:6]
    engine = graph_engine(model_dir, adapter_dir, max_gpu_adapters=1).start()
    try:
        outputs = [run_mixed(engine, [request])[0] for request in workload]  # one adapter at a time, swapped
    finally:
        engine.shutdown()
    assert outputs == expected(model_dir, adapter_dir, workload)


def _counting(function, calls: list):
    def wrapper(*args):
        calls.append(args)
        return function(*args)

    return wrapper


class Recorder(TorchDispatchMode):
    """Every op of a forward: its name, its tensor inputs' shapes and dtypes; and what it read that is neither a
    persistent buffer nor made by an earlier op of the same forward."""

    def __init__(self, persistent: set[int]):
        super().__init__()
        self.known = set(persistent)  # storages the forward may read
        self.ops: list[tuple] = []
        self.strangers: list[str] = []
        self.device_moves: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        name = str(func.overloadpacket).replace("aten::", "aten.").replace("loradock::", "loradock.")
        self.ops.append((name, tuple((tuple(t.shape), t.dtype) for t in inputs)))
        for tensor in inputs:
            if tensor.untyped_storage().data_ptr() not in self.known:
                self.strangers.append(f"{name} read a tensor {tuple(tensor.shape)} from outside the step")
        if name in ("aten._to_copy", "aten.copy_") and len({t.device for t in inputs}) > 1:
            self.device_moves.append(name)
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.known.add(tensor.untyped_storage().data_ptr())
        return out


def decode_requests(engine: Engine, lengths: list[int], slots: list[int], seed: int) -> list[Request]:
    """Requests in mid-decode: `length - 1` tokens in the cache (blocks handed out shuffled), one due."""
    rng = random.Random(seed)
    allocator = engine.cache.allocator
    requests = []
    for i, (length, slot) in enumerate(zip(lengths, slots)):
        request = Request(f"r{i}", [rng.randrange(5, 100) for _ in range(length)], SamplingParams(), None)
        request.blocks = allocator.allocate(engine.cache.blocks_needed(length))
        rng.shuffle(request.blocks)
        request.num_computed, request.adapter_slot = length - 1, slot
        requests.append(request)
    return requests


def record_forward(engine: Engine, requests: list[Request], bucket: int) -> Recorder:
    graphs = engine.runner.decode_graphs
    inputs = graphs.inputs
    assert inputs.write(requests, bucket)  # adapter tokens: the graph with LoRA layers
    persistent = {t.untyped_storage().data_ptr() for t in [*engine.runner.model.parameters(),
                                                           *engine.runner.model.buffers()]}
    persistent |= {inputs.block_tables.untyped_storage().data_ptr(), inputs.slot_mapping_long.untyped_storage().data_ptr(),
                   engine.cache.keys[0].untyped_storage().data_ptr()}
    recorder = Recorder(persistent)
    with torch.inference_mode(), recorder:
        graphs.forward(bucket)
    for request in requests:
        engine.cache.allocator.free(request.blocks)
    return recorder


def test_the_decode_forward_is_graph_safe(as_on_cuda, model_dir, adapter_dir):
    engine = graph_engine(model_dir, adapter_dir)
    try:
        short = record_forward(engine, decode_requests(engine, [3, 10, 17], [0, -1, 1], seed=1), bucket=4)
        long = record_forward(engine, decode_requests(engine, [60, 1, 35, 8], [1, 1, 0, 2], seed=2), bucket=4)
    finally:
        engine.shutdown()
    names = [name for name, _ in short.ops]
    assert "loradock.lora_shrink" in names and "loradock.paged_decode" in names  # the kernels ran as ops
    assert not HOST_SYNCS & set(names), sorted(HOST_SYNCS & set(names))
    assert not short.device_moves and not long.device_moves
    assert not short.strangers and not long.strangers, (short.strangers + long.strangers)[:5]
    assert short.ops == long.ops  # one op sequence, shapes included: one graph serves both
