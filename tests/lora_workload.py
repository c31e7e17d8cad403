"""The mixed-adapter workload the engine tests share (on the CPU and on CUDA): three PEFT adapters with different
ranks, targets and scaling options, sixteen requests over them and the base model, and PEFT's answers to them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from support import CPU, collect, peft_greedy, varied_prompts

from loradock.loadtest.random_adapters import write_random_adapter
from loradock.serve.engine import SamplingParams

MAX_NEW = 10

# Different ranks, different target sets, the scaling options peft offers.
ADAPTERS = {
    "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all-r16-rslora": dict(r=16, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    "mlp-patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["o_proj", "gate_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"gate_proj": 3},
    ),
}


def write_adapters(base_path: Path, root: Path) -> Path:
    """Each of ADAPTERS as a PEFT adapter folder under `root`, random weights seeded by its position."""
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        write_random_adapter(base_path, root / name, seed=seed, **config)
    return root


def mixed_workload(tokenizer) -> list[tuple[str | None, list[int]]]:
    """Four requests per adapter and four on the base model, interleaved: (adapter or None, prompt ids)."""
    names = [*ADAPTERS, None]
    return [(names[i % len(names)], p) for i, p in enumerate(varied_prompts(tokenizer, 16, seed=11))]


def expected(model_dir, adapter_dir, workload, quantize="none", device=CPU) -> list[list[int]]:
    """PEFT's greedy output for each request alone, on its adapter (or the bare base model)."""
    out = {}
    for name in [*ADAPTERS, None]:
        indices = [i for i, (a, _) in enumerate(workload) if a == name]
        adapter = adapter_dir / name if name else None
        tokens = peft_greedy(
            model_dir("llama"), adapter, [workload[i][1] for i in indices], MAX_NEW, quantize, device=device
        )
        out.update(zip(indices, tokens))
    return [out[i] for i in range(len(workload))]


def run_mixed(engine, workload) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0)

    async def main():
        return await asyncio.gather(
            *(collect(engine, p, params, delay=0.003 * i, adapter=a) for i, (a, p) in enumerate(workload))
        )

    return [ids for ids, _text, _reason in asyncio.run(main())]


def interleaved(tokenizer, names) -> list[tuple[str | None, list[int]]]:
    """Three requests per adapter of `names` and three on the base model, interleaved: (adapter or None, prompt)."""
    names = [*names, None]
    return [(names[i % len(names)], p) for i, p in enumerate(varied_prompts(tokenizer, 3 * len(names), seed=5))]


def peft_answers(greedy, requests) -> list[list[int]]:
    """greedy(adapter name or None, prompts) for each adapter's requests alone, in the requests' order."""
    out = {}
    for name in {a for a, _ in requests}:
        indices = [i for i, (a, _) in enumerate(requests) if a == name]
        out.update(zip(indices, greedy(name, [requests[i][1] for i in indices])))
    return [out[i] for i in range(len(requests))]


def variant_writer(model_dir, root_of, variants: dict[str, dict]):
    """architecture -> a folder holding `variants` (name -> LoraConfig fields) as PEFT adapters for that tiny model,
    written on first use; root_of(architecture) makes the folder."""
    written: dict[str, Path] = {}

    def get(architecture: str) -> Path:
        if architecture not in written:
            root = root_of(architecture)
            for seed, (name, config) in enumerate(variants.items()):
                write_random_adapter(model_dir(architecture), root / name, seed=seed, **config)
            written[architecture] = root
        return written[architecture]

    return get


def peft_answers_that_differ(path: Path, adapters: Path, requests, names, quantize: str = "none",
                             device=CPU) -> list[list[int]]:
    """PEFT's greedy answers for `requests` on the adapters under `adapters` (the base `quantize`d, on `device`), each
    adapter of `names` checked to change the base's answers: the oracle is only worth something if it does."""
    expected = peft_answers(
        lambda name, prompts: peft_greedy(path, name and adapters / name, prompts, MAX_NEW, quantize, device=device),
        requests,
    )
    base_answers = [expected[i] for i, (a, _) in enumerate(requests) if a is None]
    for name in names:
        assert [expected[i] for i, (a, _) in enumerate(requests) if a == name] != base_answers, name
    return expected
