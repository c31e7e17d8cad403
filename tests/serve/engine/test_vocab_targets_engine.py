"""Adapters on the input embeddings and on the output head, in one running batch with a plain adapter and the base
model: every request's greedy output equals PEFT's for its adapter alone (fp32, CPU), on a base whose head is its own
(llama) and one whose head is tied to its scaled embeddings (gemma), eagerly and through the decode graphs' path;
in bfloat16 (the head packed for oneDNN) against PEFT in bfloat16; on a CUDA device (skipped elsewhere;
loadtest/cuda_checks.sh runs it) on an nf4 base through the Triton kernels and CUDA graphs.
Without slots for those modules (the default targets) such an adapter is refused, naming the option to set."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from bf16_oracle import agreement, generate_greedy, peft_bf16
from lora_workload import (
    ADAPTERS, MAX_NEW, interleaved, peft_answers_that_differ, run_mixed, variant_writer,
)
from support import CPU, varied_prompts

from loradock.adapters.errors import AdapterError
from loradock.kernels.packed_linear import PackedLinear, packing_available
from loradock.serve.engine import Engine, EngineConfig, SamplingParams
from loradock.serve.engine.graph_runner import EagerGraph
from loradock.serve.models.loader import load_model

VARIANTS = {
    "embed": dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "v_proj"]),
    "head": dict(r=6, lora_alpha=12, target_modules=["lm_head"]),
    "qv-r8": ADAPTERS["qv-r8"],  # plain LoRA beside them
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


@pytest.fixture(scope="module")
def variant_dirs(model_dir, tmp_path_factory):
    """architecture -> a folder holding VARIANTS for that tiny model, written once."""
    return variant_writer(model_dir, lambda architecture: tmp_path_factory.mktemp(f"vocab-{architecture}"), VARIANTS)


def start(path: Path, adapters: Path, decode_graph=None, **config) -> Engine:
    model, tok = load_model(path, "none", torch.float32, CPU)
    config = EngineConfig(adapters_dir=str(adapters), max_gpu_adapters=4, max_batch_tokens=64, **config)
    return Engine(model, tok, config, CPU, decode_graph=decode_graph).start()


@pytest.mark.parametrize("architecture, decode_graph", [("llama", None), ("gemma", None), ("llama", EagerGraph)])
def test_embedding_and_head_adapters_in_a_mixed_batch_equal_peft(model_dir, tokenizer, variant_dirs, architecture,
                                                                 decode_graph):
    path, adapters = model_dir(architecture), variant_dirs(architecture)
    requests = interleaved(tokenizer, VARIANTS)
    expected = peft_answers_that_differ(path, adapters, requests, VARIANTS)
    engine = start(path, adapters, decode_graph, lora_target_modules=TARGETS)
    try:
        assert run_mixed(engine, requests) == expected
    finally:
        engine.shutdown()


@pytest.mark.parametrize("name, module", [("embed", "embed_tokens"), ("head", "lm_head")])
def test_an_adapter_on_a_module_without_slots_is_refused(model_dir, tokenizer, variant_dirs, name, module):
    engine = start(model_dir("llama"), variant_dirs("llama"))  # default targets: every linear but the head
    try:
        with pytest.raises(AdapterError, match=f"--lora-target-modules naming {module}") as refusal:
            run_mixed(engine, [(name, tokenizer("hello").input_ids)])
        assert refusal.value.code == "no_slots"
        assert run_mixed(engine, [("qv-r8", tokenizer("hello").input_ids)])[0]  # the others are served
    finally:
        engine.shutdown()


def test_the_embeddings_and_head_slots_are_sized_by_the_vocabulary(model_dir, variant_dirs):
    engine = start(model_dir("llama"), variant_dirs("llama"), lora_target_modules=["q_proj", "embed_tokens", "lm_head"])
    try:
        layers = engine.adapters.layers
        vocab, hidden = engine.vocab_size, 64
        assert list(layers) == ["model.embed_tokens", "model.layers.0.self_attn.q_proj",
                                "model.layers.1.self_attn.q_proj", "lm_head"]
        assert layers["model.embed_tokens"].lora_A.shape == (4, vocab, 64)  # [S, vocab, R]
        assert layers["model.embed_tokens"].lora_B.shape == (4, 64, hidden)  # [S, R, dim]
        assert layers["lm_head"].lora_B.shape == (4, vocab, 64)  # [S, out, R]
    finally:
        engine.shutdown()


def test_prompt_logprobs_through_a_head_adapter_equal_peft(model_dir, tokenizer, variant_dirs):
    """The head's LoRA on prompt rows too: a 70-token prompt scored in chunks beside a base request."""
    from peft import PeftModel

    path, adapters = model_dir("llama"), variant_dirs("llama")
    prompt = varied_prompts(tokenizer, 4, seed=3)[-1]
    peft_model = PeftModel.from_pretrained(load_model(path, "none", torch.float32, CPU)[0], adapters / "head").eval()
    with torch.inference_mode():
        logits = peft_model(torch.tensor([prompt])).logits[0, :-1]  # [L - 1, vocab]
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]  # [L - 1]
    engine = start(path, adapters, lora_target_modules=TARGETS)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1)

    async def scored(adapter):
        return [out async for out in engine.generate(prompt, params, adapter=adapter)][0].prompt_logprobs

    async def both():
        return await asyncio.gather(scored("head"), scored(None))

    try:
        ours, _ = asyncio.run(both())
    finally:
        engine.shutdown()
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in ours]), expected, rtol=0, atol=1e-4)


def test_in_bf16_embedding_and_head_adapters_agree_with_peft_in_bf16(model_dir, tokenizer, variant_dirs):
    path, adapters = model_dir("llama"), variant_dirs("llama")
    requests = interleaved(tokenizer, VARIANTS)
    engine = Engine.from_config(EngineConfig(
        model=str(path), dtype="bfloat16", device="cpu", adapters_dir=str(adapters), max_gpu_adapters=4,
        max_batch_tokens=64, kv_cache_memory="8MiB", lora_target_modules=TARGETS,
    ))
    with engine:
        generated = generate_greedy(engine, requests, MAX_NEW)
    assert isinstance(engine.adapters.layers["lm_head"].base, PackedLinear) or not packing_available()
    found = agreement(peft_bf16(path, {name: adapters / name for name in VARIANTS}), requests, generated)
    assert found.same_greedy_share >= 0.9, found  # the bounds of test_bf16_engine
    assert found.max_prob_error <= 0.05 and found.mean_logprob_error <= 0.05, found


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_with_embedding_and_head_adapters_on_nf4_equals_peft(model_dir, tokenizer, variant_dirs):
    cuda = torch.device("cuda")
    path, adapters = model_dir("llama"), variant_dirs("llama")
    requests = interleaved(tokenizer, VARIANTS)
    expected = peft_answers_that_differ(path, adapters, requests, VARIANTS, "nf4", cuda)
    model, tok = load_model(path, "nf4", torch.float32, cuda)
    config = EngineConfig(adapters_dir=str(adapters), max_gpu_adapters=4, max_batch_tokens=64,
                          lora_target_modules=TARGETS)
    engine = Engine(model, tok, config, cuda).start()
    try:
        assert run_mixed(engine, requests) == expected
    finally:
        engine.shutdown()

