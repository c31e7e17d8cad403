"""DoRA and lora_bias adapters in one running batch with plain adapters and the base model: every request's greedy
output equals PEFT's for its adapter alone (fp32, CPU), on a base without biases (llama) and one with (qwen2), and
DoRA on an nf4 base; on a CUDA device (skipped elsewhere; loadtest/cuda_checks.sh runs it) all of them on an nf4 base
through the compiled Triton kernels and CUDA graphs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_workload import (
    ADAPTERS, MAX_NEW, interleaved, peft_answers, peft_answers_that_differ, run_mixed, variant_writer,
)
from support import CPU, hf_greedy, unpacked_nf4

from loradock.serve.engine import Engine, EngineConfig
from loradock.serve.models.loader import load_model

VARIANTS = {
    "dora": dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, rank_pattern={"v_proj": 5}),
    "lora-bias": dict(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], lora_bias=True),
    "qv-r8": ADAPTERS["qv-r8"],  # plain LoRA beside them
}


@pytest.fixture(scope="module")
def variant_dirs(model_dir, tmp_path_factory):
    """architecture -> a folder holding VARIANTS for that tiny model, written once."""
    return variant_writer(model_dir, lambda architecture: tmp_path_factory.mktemp(f"variants-{architecture}"), VARIANTS)


def run(model, tokenizer, adapters: Path, requests, device: torch.device = CPU) -> list[list[int]]:
    engine = Engine(model, tokenizer, EngineConfig(adapters_dir=str(adapters), max_gpu_adapters=4,
                                                   max_batch_tokens=64), device).start()
    try:
        return run_mixed(engine, requests)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_dora_and_lora_bias_in_a_mixed_batch_equal_peft(model_dir, tokenizer, variant_dirs, architecture):
    path, adapters = model_dir(architecture), variant_dirs(architecture)
    requests = interleaved(tokenizer, VARIANTS)
    expected = peft_answers_that_differ(path, adapters, requests, VARIANTS)
    model, tok = load_model(path, "none", torch.float32, CPU)
    assert run(model, tok, adapters, requests) == expected


def test_dora_on_an_nf4_base_equals_peft_on_the_same_nf4_base(model_dir, tokenizer, variant_dirs):
    from peft import PeftModel

    path, adapters = model_dir("llama"), variant_dirs("llama")
    requests = interleaved(tokenizer, ["dora"])

    def greedy(name, prompts):
        model = unpacked_nf4(load_model(path, "nf4", torch.float32, CPU)[0])
        model = PeftModel.from_pretrained(model, adapters / name) if name else model
        return [hf_greedy(model.eval(), prompt, MAX_NEW) for prompt in prompts]

    expected = peft_answers(greedy, requests)
    model, tok = load_model(path, "nf4", torch.float32, CPU)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert run(unpacked_nf4(model), tok, adapters, requests) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_with_dora_and_lora_bias_on_nf4_equals_peft(model_dir, tokenizer, variant_dirs):
    cuda = torch.device("cuda")
    path, adapters = model_dir("llama"), variant_dirs("llama")
    requests = interleaved(tokenizer, VARIANTS)
    expected = peft_answers_that_differ(path, adapters, requests, VARIANTS, "nf4", cuda)
    model, tok = load_model(path, "nf4", torch.float32, cuda)
    assert run(model, tok, adapters, requests, cuda) == expected
