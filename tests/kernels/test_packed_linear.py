"""bf16 linears packed for oneDNN (`packed_linear.py`): the same numbers as `F.linear`, bit for bit, whole or in
chunks (run by the engine thread and the compiled ops' helper thread together), alone and through a whole engine
(under the compiled LoRA layer: test_cpu_lora.py)."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from loradock.kernels.packed_linear import (
    PACKED_ENV, PackedLinear, chunk_count, pack_linears, packing_available, run_linears,
)
from loradock.serve.engine import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not packing_available(), reason="oneDNN cannot pack bf16 weights on this CPU")


@pytest.mark.parametrize("threads", [1, 2])  # one: the helper thread has the other core and runs chunks
@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [(1,), (5,), (16,), (33,), (300,), (2, 7)])
def test_a_packed_linear_gives_f_linear_bit_for_bit(rows, bias, chunks, threads):
    torch.manual_seed(0)
    linear = torch.nn.Linear(200, 96, bias=bias, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(*rows, 200, dtype=torch.bfloat16)
    packed = PackedLinear(linear, batch_rows=16, chunks=chunks)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(3):  # the chunks go to whichever thread claims them first
            assert torch.equal(packed(x), linear(x))
        with torch.inference_mode():
            assert torch.equal(packed(x), linear(x))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(packed.weight, linear.weight) and len(packed.packed) == chunks
    assert all(chunk.dtype == torch.bfloat16 for chunk in packed.packed)


@pytest.mark.parametrize("split", [False, True])
def test_weights_are_split_in_an_even_number_of_chunks_where_a_helper_has_a_core(split):
    assert [chunk_count(rows, split) for rows in (192, 576, 1536, 24576, 49152)] == (
        [1, 2, 2, 2, 4] if split else [1, 1, 1, 1, 1]
    )


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

    def answers(threads: int) -> tuple[list, int, int]:
        """The answers, the packed linears and those in chunks, with torch on `threads` compute threads."""
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            engine = Engine.from_config(EngineConfig(model=str(model_dir("llama")), dtype="bfloat16", device="cpu",
                                                     max_gpu_adapters=2, kv_cache_memory="8MiB"))
            with engine:
                async def one(prompt):
                    return [(e.token_id, e.logprobs) async for e in engine.generate(prompt, params)]

                async def all_of_them():
                    return await asyncio.gather(*(one(p) for p in prompts))

                found = asyncio.run(all_of_them())
                packed = [m for m in engine.runner.model.modules() if type(m) is PackedLinear]
        finally:
            torch.set_num_threads(previous)
        return found, len(packed), sum(len(m.packed) > 1 for m in packed)

    cores = len(os.sched_getaffinity(0))
    whole_answers, whole, whole_split = answers(cores)  # no core left to the helper thread: weights whole
    split_answers, split, chunked = answers(1) if cores > 1 else (whole_answers, whole, 1)
    monkeypatch.setenv(PACKED_ENV, "off")
    plain_answers, unpacked, _ = answers(cores)
    assert whole > 0 and split == whole and unpacked == 0
    assert whole_split == 0 and chunked > 0
    assert whole_answers == plain_answers and split_answers == plain_answers


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_linears_run_together_give_each_ones_f_linear(threads):
    torch.manual_seed(0)
    linears = [torch.nn.Linear(200, out, bias=bias, dtype=torch.bfloat16).requires_grad_(False)
               for out, bias in ((96, True), (24, False), (300, True))]
    group = [PackedLinear(linear, batch_rows=16, chunks=chunks) for linear, chunks in zip(linears, (2, 1, 3))]
    x = torch.randn(16, 200, dtype=torch.bfloat16)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            ys = run_linears(group, x)
            assert all(torch.equal(y, linear(x)) for y, linear in zip(ys, linears))
            mixed = run_linears([group[0], linears[1]], x)  # not all packed: one by one
            assert torch.equal(mixed[0], linears[0](x)) and torch.equal(mixed[1], linears[1](x))
    finally:
        torch.set_num_threads(previous)
