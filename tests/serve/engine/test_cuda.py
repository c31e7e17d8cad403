"""On a CUDA device: the engine on an nf4 base with adapters in one batch (the compiled Triton kernels, paged KV
cache in device memory, decode steps replayed from CUDA graphs) gives PEFT's greedy tokens on the same nf4 model,
request for request; the graphs' replays equal the same decode path run eagerly with 0, 8 and 32 adapters, and
with an adapter swapped into the slot a graph reads between replays.

CI has no GPU, so these are skipped there; run them where there is one (`pytest tests/serve/engine/test_cuda.py`).
The Triton kernels' own compiled tests are in tests/kernels/ (test_triton_lora.py, test_paged_decode.py), QLoRA
training on the GPU in tests/train/test_train.py (the trainer takes the GPU when there is one)."""

from __future__ import annotations

import pytest
import torch
from lora_workload import ADAPTERS, expected, run_mixed
from support import start_engine, varied_prompts

from loradock.loadtest.random_adapters import write_random_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_cuda_engine_with_mixed_adapters_equals_peft(model_dir, adapter_dir, workload, quantize):
    reference = expected(model_dir, adapter_dir, workload, quantize=quantize, device=CUDA)
    base_outputs = [reference[i] for i, (a, _) in enumerate(workload) if a is None]
    for name in ADAPTERS:  # the oracle is only worth something if the adapters change the output
        assert [reference[i] for i, (a, _) in enumerate(workload) if a == name] != base_outputs
    engine = start_engine(
        model_dir("llama"), quantize=quantize, device=CUDA, adapters_dir=str(adapter_dir), max_gpu_adapters=2,
        max_batch_tokens=64,
    )
    try:
        assert engine.cache.keys[0].device.type == "cuda"
        assert run_mixed(engine, workload) == reference
        assert run_mixed(engine, workload) == reference  # again, with adapters evicted and reloaded into 2 slots
    finally:
        engine.shutdown()
    assert engine.adapters.stats.evictions["device"] > 0


def graph_engine(model_dir, adapters_dir, cuda_graphs: bool, slots: int):
    return start_engine(model_dir("llama"), quantize="nf4", device=CUDA, adapters_dir=str(adapters_dir),
                        max_gpu_adapters=slots, max_num_seqs=32, max_model_len=256, cuda_graphs=cuda_graphs)


@pytest.fixture(scope="module")
def many_adapters(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("many-adapters")
    for i in range(32):
        write_random_adapter(model_dir("llama"), root / f"adapter-{i}", seed=i, r=8, lora_alpha=16,
                             target_modules="all-linear")
    return root


@pytest.mark.parametrize("count", [0, 8, 32])
def test_cuda_graph_replays_equal_the_eager_decode(model_dir, many_adapters, tokenizer, count):
    prompts = varied_prompts(tokenizer, 32, seed=5)
    workload = [(f"adapter-{i % count}" if count else None, prompt) for i, prompt in enumerate(prompts)]
    outputs = []
    for cuda_graphs in (True, False):
        engine = graph_engine(model_dir, many_adapters, cuda_graphs, slots=32)
        try:
            outputs.append(run_mixed(engine, workload))
        finally:
            engine.shutdown()
    assert outputs[0] == outputs[1]


def test_an_adapter_swapped_into_the_slot_a_graph_reads(model_dir, many_adapters, tokenizer):
    # one slot: each request's adapter is copied into the buffers the captured graphs read, between replays
    prompts = varied_prompts(tokenizer, 6, seed=6)
    workload = [(f"adapter-{i}", prompt) for i, prompt in enumerate(prompts)]
    results = []
    for cuda_graphs in (True, False):
        engine = graph_engine(model_dir, many_adapters, cuda_graphs, slots=1)
        try:
            results.append([run_mixed(engine, [request])[0] for request in workload])
        finally:
            engine.shutdown()
    assert results[0] == results[1]
    assert len({tuple(tokens) for tokens in results[0]}) > 1  # the adapters do differ
