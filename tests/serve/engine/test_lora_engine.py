"""Many adapters in one running batch: every request's greedy output equals PEFT's for its adapter alone."""

from __future__ import annotations

import asyncio
import threading

import pytest
from lora_workload import ADAPTERS, MAX_NEW, expected, run_mixed
from support import collect, start_engine, wait_until

from loradock.adapters.manager import UnknownAdapter
from loradock.adapters.peft_format import AdapterError
from loradock.serve.engine import SamplingParams

@pytest.fixture(scope="module")
def peft_reference(model_dir, adapter_dir, workload):
    reference = expected(model_dir, adapter_dir, workload)
    # The oracle is only worth something if the adapters change the output.
    base_outputs = [reference[i] for i, (a, _) in enumerate(workload) if a is None]
    for name in ADAPTERS:
        assert [reference[i] for i, (a, _) in enumerate(workload) if a == name] != base_outputs
    return reference


def test_mixed_adapters_in_one_batch_equal_peft(model_dir, adapter_dir, workload, peft_reference):
    engine = start_engine(model_dir("llama"), adapters_dir=str(adapter_dir), max_gpu_adapters=4, max_batch_tokens=64)
    try:
        assert run_mixed(engine, workload) == peft_reference
    finally:
        engine.shutdown()
    assert engine.adapters.stats.loads == 3 and engine.adapters.stats.evictions["device"] == 0


def test_fewer_slots_than_adapters_evicts_and_reloads(model_dir, adapter_dir, workload, peft_reference):
    engine = start_engine(
        model_dir("llama"), adapters_dir=str(adapter_dir), max_gpu_adapters=2, max_cpu_adapters=1, max_batch_tokens=64
    )
    try:
        assert run_mixed(engine, workload) == peft_reference
        assert run_mixed(engine, workload) == peft_reference  # again, from whatever the tiers hold now
    finally:
        engine.shutdown()
    assert engine.adapters.stats.evictions["device"] > 0
    assert engine.adapters.stats.loads > 3  # the host cache holds one: the others were read from disk again
    assert all(v.pins == 0 for v in engine.adapters.registered())


def test_nf4_base_with_adapters_equals_peft_on_the_same_nf4_model(model_dir, adapter_dir, workload):
    reference = expected(model_dir, adapter_dir, workload, quantize="nf4")
    engine = start_engine(
        model_dir("llama"), quantize="nf4", adapters_dir=str(adapter_dir), max_gpu_adapters=4, max_batch_tokens=64
    )
    try:
        assert run_mixed(engine, workload) == reference
    finally:
        engine.shutdown()


def test_a_request_waiting_for_a_slot_does_not_hold_up_others(model_dir, adapter_dir, workload, peft_reference):
    engine = start_engine(model_dir("llama"), adapters_dir=str(adapter_dir), max_gpu_adapters=1)
    prompt_a, prompt_b, prompt_base = workload[0][1], workload[2][1], workload[3][1]  # 2: "mlp-patterns", 3: base
    short = SamplingParams(max_tokens=MAX_NEW, temperature=0)

    async def scenario():
        holder = engine.generate(prompt_a, SamplingParams(max_tokens=80, temperature=0, ignore_eos=True), adapter="qv-r8")
        await anext(holder)  # "qv-r8" now holds the only slot
        waiting = asyncio.create_task(collect(engine, prompt_b, short, adapter="mlp-patterns"))
        base = await collect(engine, prompt_base, short)  # flows past the waiting request
        waiting_done_early = waiting.done()
        held = [out async for out in holder]
        return base, waiting_done_early, len(held), await waiting

    try:
        base, waiting_done_early, held, waited = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert base[0] == peft_reference[3]
    assert not waiting_done_early
    assert held == 79
    assert waited[0] == peft_reference[2]


def test_unregistering_fails_new_requests_lets_running_ones_finish_then_frees_memory(
    model_dir, adapter_dir, workload, peft_reference
):
    engine = start_engine(model_dir("llama"), adapters_dir=str(adapter_dir), max_gpu_adapters=2)
    prompt = workload[0][1]
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0)

    async def scenario():
        stream = engine.generate(prompt, params, adapter="qv-r8")
        first = await anext(stream)
        version = engine.resolve_adapter("qv-r8")
        engine.unregister_adapter("qv-r8")
        with pytest.raises(UnknownAdapter):
            await collect(engine, prompt, params, adapter="qv-r8")
        rest = [out.token_id async for out in stream]
        return version, [first.token_id, *rest]

    try:
        version, tokens = asyncio.run(scenario())
        assert tokens == peft_reference[0]  # finished on the version it started with
        assert wait_until(lambda: version.slot is None and version.weights is None)
        assert len(engine.adapters.free_slots) == 2 and version not in engine.adapters.host
        # Registering the folder again serves it afresh.
        engine.register_adapter("qv-r8", adapter_dir / "qv-r8")
        assert asyncio.run(collect(engine, prompt, params, adapter="qv-r8"))[0] == peft_reference[0]
    finally:
        engine.shutdown()


def test_a_request_whose_adapter_is_unregistered_while_being_read_still_finishes(
    model_dir, adapter_dir, workload, peft_reference
):
    """The request pinned the version and started its read from disk; the name is unregistered before the read
    ends (an admin unload, a replica's adapter dropped by Serve): the request is served from the read all the same,
    then the memory is freed. The read is held at a gate so the unregister lands while it is in progress."""
    engine = start_engine(model_dir("llama"), max_gpu_adapters=2)
    engine.register_adapter("qv-r8", adapter_dir / "qv-r8")  # registered, not read yet
    manager, gate = engine.adapters, threading.Event()
    read = manager._timed_read
    manager._timed_read = lambda *args: gate.wait(30) and read(*args)
    prompt, params = workload[0][1], SamplingParams(max_tokens=MAX_NEW, temperature=0)

    async def scenario():
        version = engine.resolve_adapter("qv-r8")
        request = asyncio.create_task(collect(engine, prompt, params, adapter="qv-r8"))
        while version.loading is None:
            await asyncio.sleep(0.01)
        engine.unregister_adapter("qv-r8")
        gate.set()
        return version, await asyncio.wait_for(request, 60)

    try:
        version, (tokens, _, _) = asyncio.run(scenario())
        assert tokens == peft_reference[0]
        assert wait_until(lambda: version.slot is None and version.weights is None)
        assert version not in manager.host
    finally:
        engine.shutdown()


def test_a_refused_adapter_fails_its_requests_with_the_reason(model_dir, adapter_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter_dir / "qv-r8" / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    engine = start_engine(model_dir("llama"), max_gpu_adapters=2)
    engine.register_adapter("bad", bad)
    try:
        with pytest.raises(AdapterError) as refused:
            asyncio.run(collect(engine, [1, 5, 6], SamplingParams(max_tokens=3), adapter="bad"))
        assert refused.value.code == "corrupt_file"
        # the engine keeps serving
        assert len(asyncio.run(collect(engine, [1, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True)))[0]) == 3
    finally:
        engine.shutdown()
