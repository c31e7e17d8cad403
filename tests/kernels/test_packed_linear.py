"""bf16 linears packed for oneDNN (`packed_linear.py`): the same numbers as `F.linear`, bit for bit, alone and
through a whole engine (under the compiled LoRA layer: test_cpu_lora.py)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from loradock.kernels.packed_linear import PACKED_ENV, PackedLinear, pack_linears, packing_available
from loradock.serve.engine import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [(1,), (5,), (16,), (33,), (300,), (2, 7)])
def test_a_packed_linear_gives_f_linear_bit_for_bit(rows, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(200, 96, bias=bias, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(*rows, 200, dtype=torch.bfloat16)
    packed = PackedLinear(linear, batch_rows=16)
    assert torch.equal(packed(x), linear(x))
    assert torch.equal(packed.weight, linear.weight) and packed.packed.dtype == torch.bfloat16


def tied_model(dtype: torch.dtype) -> torch.nn.Module:
    """An embedding, a hidden linear, and an output head sharing the embedding's weight."""
    model = torch.nn.ModuleDict({
        "embed": torch.nn.Embedding(50, 24), "hidden": torch.nn.Linear(24, 24), "head": torch.nn.Linear(24, 50, bias=False),
    }).to(dtype).requires_grad_(False)
    model["head"].weight = model["embed"].weight
    return model


def test_pack_linears_packs_every_bf16_linear_and_keeps_a_tied_embedding(monkeypatch):
    monkeypatch.delenv(PACKED_ENV, raising=False)
    model = tied_model(torch.bfloat16)
    tokens = torch.tensor([[3, 7, 49]])
    embedded = model["embed"](tokens)
    expected = model["head"](model["hidden"](embedded))

    assert pack_linears(model, batch_rows=8) == 2

    assert type(model["hidden"]) is PackedLinear and type(model["head"]) is PackedLinear
    assert torch.equal(model["embed"](tokens), embedded)  # the embedding kept its own weight
    assert torch.equal(model["head"](model["hidden"](embedded)), expected)


def test_pack_linears_leaves_float32_alone_and_can_be_turned_off(monkeypatch):
    assert pack_linears(tied_model(torch.float32), batch_rows=8) == 0
    monkeypatch.setenv(PACKED_ENV, "off")
    assert pack_linears(tied_model(torch.bfloat16), batch_rows=8) == 0


def test_a_bf16_engine_packs_its_linears_and_answers_as_unpacked(model_dir, tokenizer, monkeypatch):
    prompts = [tokenizer.encode(text) for text in ("The cat sat on", "Numbers: 1, 2, 3,", "Paris is the capital")]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)

    def answers() -> tuple[list, int]:
        engine = Engine.from_config(EngineConfig(model=str(model_dir("llama")), dtype="bfloat16", device="cpu",
                                                 max_gpu_adapters=2, kv_cache_memory="8MiB"))
        with engine:
            async def one(prompt):
                return [(e.token_id, e.logprobs) async for e in engine.generate(prompt, params)]

            async def all_of_them():
                return await asyncio.gather(*(one(p) for p in prompts))

            found = asyncio.run(all_of_them())
            packed = sum(type(m) is PackedLinear for m in engine.runner.model.modules())
        return found, packed

    packed_answers, packed = answers()
    monkeypatch.setenv(PACKED_ENV, "off")
    plain_answers, unpacked = answers()
    assert packed > 0 and unpacked == 0
    assert packed_answers == plain_answers
