"""On a CUDA device: the engine on an nf4 base with adapters in one batch (the compiled Triton kernels, paged KV
cache in device memory) gives PEFT's greedy tokens on the same nf4 model, request for request.

CI has no GPU, so these are skipped there; run them where there is one (`pytest tests/test_cuda.py`).
The Triton kernels' own compiled tests are in test_kernels.py, QLoRA training on the GPU in test_train.py
(the trainer takes the GPU when there is one)."""

from __future__ import annotations

import pytest
import torch
from lora_workload import ADAPTERS, expected, run_mixed
from support import start_engine

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
