"""The fused decoder layers of bfloat16 CPU engines (`fused_layers.py`, `kernels/cpu_fused.cpp`): each fused op
against the HF code it replaces, and whole engines with and without them on every architecture they take (PEFT in
bfloat16 against the fused engine: test_bf16_engine.py, which runs them)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from loradock.kernels.cpu_build import cpu_ops
from loradock.serve.engine import Engine, EngineConfig, SamplingParams
from loradock.serve.engine.fused_layers import FUSED_ENV, fuse_decoder_layers

BF16_ULP = 2**-7  # one unit in the last place of a bfloat16 in [1, 2)


@pytest.fixture(scope="module")
def ops():
    compiled = cpu_ops()
    assert compiled is not None, "the compiled CPU ops did not build: see the loradock.kernels warning"
    return compiled


def within_an_ulp(found: torch.Tensor, expected: torch.Tensor, share: float = 0.99) -> None:
    """Equal but for the last bit of a few elements."""
    assert found.dtype == expected.dtype == torch.bfloat16 and found.shape == expected.shape
    found, expected = found.float(), expected.float()
    assert (found == expected).float().mean() >= share
    assert ((found - expected).abs() <= BF16_ULP * expected.abs().clamp_min(2**-126)).all()


@pytest.mark.parametrize("rows", [1, 7, 16])
def test_the_norms_are_hf_rmsnorm_but_for_a_last_bit(ops, rows):
    torch.manual_seed(rows)
    norm = LlamaRMSNorm(576, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
    x, residual = (torch.randn(rows, 576) * 3).bfloat16(), torch.randn(rows, 576).bfloat16()
    with torch.inference_mode():
        within_an_ulp(ops.rms_norm(x, norm.weight, 1e-5), norm(x))
        summed, normed = ops.add_rms_norm(x, residual, norm.weight, 1e-5)
        assert torch.equal(summed, residual + x)
        within_an_ulp(normed, norm(residual + x))


def test_silu_and_mul_is_hf_activation_times_up_but_for_a_last_bit(ops):
    torch.manual_seed(0)
    gate = torch.cat([torch.randn(9, 1536) * 4, torch.full((1, 1536), -100.0), torch.full((1, 1536), 100.0)])
    gate, up = gate.bfloat16(), torch.randn(11, 1536).bfloat16()
    within_an_ulp(ops.silu_and_mul(gate, up), torch.nn.functional.silu(gate) * up)


def test_rotary_is_hf_rotary_bit_for_bit(ops):
    torch.manual_seed(0)
    q, k = torch.randn(5, 9, 64).bfloat16(), torch.randn(5, 3, 64).bfloat16()
    cos, sin = torch.randn(5, 64).bfloat16(), torch.randn(5, 64).bfloat16()
    expected_q, expected_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None],
                                                  sin[None])
    assert torch.equal(ops.rotary(q, cos, sin), expected_q[0].transpose(0, 1))
    assert torch.equal(ops.rotary(k, cos, sin), expected_k[0].transpose(0, 1))


@pytest.mark.parametrize("bad", ["float32", "odd_dim", "cos_rows"])
def test_the_fused_ops_refuse_what_they_do_not_take(ops, bad):
    x = torch.randn(2, 4, 8).bfloat16()
    cos = sin = torch.randn(2, 8).bfloat16()
    with pytest.raises(RuntimeError, match="rotary"):
        if bad == "float32":
            ops.rotary(x.float(), cos, sin)
        elif bad == "odd_dim":
            ops.rotary(torch.randn(2, 4, 7).bfloat16(), torch.randn(2, 7).bfloat16(), torch.randn(2, 7).bfloat16())
        else:
            ops.rotary(x, cos[:1], sin[:1])


def test_only_bf16_models_of_the_supported_architectures_are_fused(model_dir):
    def fused(architecture: str, dtype: torch.dtype) -> int:
        model = AutoModelForCausalLM.from_pretrained(model_dir(architecture), dtype=dtype)
        return fuse_decoder_layers(model)

    assert fused("llama", torch.bfloat16) == 2  # the tiny models have two layers
    assert fused("llama", torch.float32) == 0  # float32 is checked token for token against PEFT: HF's forward
    assert fused("gemma", torch.bfloat16) == 0  # (1 + weight) norms, GELU


def engine_answers(model: str, prompts: list[list[int]]) -> list:
    """Greedy tokens with their top-2 log probabilities, from a bfloat16 CPU engine."""
    engine = Engine.from_config(EngineConfig(model=model, dtype="bfloat16", device="cpu", max_gpu_adapters=2,
                                             kv_cache_memory="8MiB"))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    with engine:
        layers = engine.runner.model.model.layers
        on = all("forward" in vars(layer) for layer in layers)

        async def one(prompt):
            return [(e.token_id, e.logprobs) async for e in engine.generate(prompt, params)]

        async def all_of_them():
            return await asyncio.gather(*(one(p) for p in prompts))

        return on, asyncio.run(all_of_them())


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_fused_engine_answers_as_hf_layers_do(model_dir, tokenizer, monkeypatch, architecture):
    prompts = [tokenizer.encode(text) for text in ("The cat sat on", "Numbers: 1, 2, 3,", "Paris is the capital")]
    monkeypatch.delenv(FUSED_ENV, raising=False)
    fused_on, fused = engine_answers(str(model_dir(architecture)), prompts)
    monkeypatch.setenv(FUSED_ENV, "off")
    hf_on, hf = engine_answers(str(model_dir(architecture)), prompts)
    assert fused_on and not hf_on
    tokens = [[token for token, _ in answer] for answer in fused]
    assert tokens == [[token for token, _ in answer] for answer in hf]
    for fused_answer, hf_answer in zip(fused, hf):
        for (_, fused_logprobs), (_, hf_logprobs) in zip(fused_answer, hf_answer):
            assert fused_logprobs.logprob == pytest.approx(hf_logprobs.logprob, abs=0.05)
            assert [token for token, _ in fused_logprobs.top] == [token for token, _ in hf_logprobs.top]
