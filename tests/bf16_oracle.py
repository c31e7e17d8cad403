"""PEFT in bfloat16 as the oracle of the engine in bfloat16 (DESIGN.md, principles 8 and 9).

Two bfloat16 computations of one model differ in their roundings, so greedy decoding of the two drifts apart at
the first near tie and compares nothing after it. The engine's greedy tokens are instead scored teacher-forced: PEFT
(base and adapter weights in bfloat16, one request alone) reads each prompt followed by the engine's own tokens in
one forward pass, and for every generated position gives its log-probabilities of the engine's top tokens and its
own greedy choice. The tests bound the differences of those probabilities (the largest) and log-probabilities (the
mean: a rare token's log-probability is noisy in bfloat16, its probability is not), and count the positions whose
greedy token agrees.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loradock.serve.engine import Engine, SamplingParams
from loradock.serve.models.loader import load_model

TOP = 5  # alternatives the engine reports per generated token, all compared


@dataclass(frozen=True)
class Generated:
    """A request's greedy tokens from the engine, each with the engine's log-probabilities of its top tokens."""

    tokens: list[int]
    top: list[tuple[tuple[int, float], ...]]  # per token: (token id, log-probability), most likely first


@dataclass(frozen=True)
class Agreement:
    """How closely PEFT's next-token distributions match the engine's over every generated position."""

    positions: int
    same_greedy: int  # positions where PEFT's greedy token is the engine's
    # over each position's top tokens: the largest |engine - PEFT| probability, and the mean |engine - PEFT|
    # log-probability in nats
    max_prob_error: float
    mean_logprob_error: float

    @property
    def same_greedy_share(self) -> float:
        return self.same_greedy / self.positions


def generate_greedy(engine: Engine, workload: list[tuple[str | None, list[int]]], max_tokens: int) -> list[Generated]:
    """The workload's requests (adapter or None, prompt ids) all at once through the engine, greedy."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=TOP)

    async def one(adapter, prompt) -> Generated:
        tokens, top = [], []
        async for output in engine.generate(prompt, params, adapter=adapter):
            tokens.append(output.token_id)
            top.append(output.logprobs.top)
        return Generated(tokens, top)

    async def main():
        return await asyncio.gather(*(one(adapter, prompt) for adapter, prompt in workload))

    return asyncio.run(main())


def peft_bf16(base_path: Path, adapters: dict[str, Path]):
    """The base in bfloat16 with every adapter loaded by PEFT, its LoRA weights kept in bfloat16 like the engine's."""
    from peft import PeftModel

    base, _ = load_model(base_path, "none", torch.bfloat16, torch.device("cpu"))
    first, *rest = adapters
    model = PeftModel.from_pretrained(base, adapters[first], adapter_name=first, autocast_adapter_dtype=False)
    for name in rest:
        model.load_adapter(adapters[name], adapter_name=name, autocast_adapter_dtype=False)
    return model.eval()


def agreement(model, workload: list[tuple[str | None, list[int]]], generated: list[Generated]) -> Agreement:
    """The engine's generated tokens scored by `model` (`peft_bf16`), one request alone, teacher-forced."""
    positions = same = 0
    prob_errors, logprob_errors = [], []
    for (adapter, prompt), request in zip(workload, generated):
        with torch.inference_mode(), _adapter(model, adapter):
            ids = torch.tensor([prompt + request.tokens[:-1]])
            logits = model(ids).logits[0, len(prompt) - 1 :]  # [n, vocab]: the next token after each prefix
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        positions += len(request.tokens)
        same += sum(int(g) == t for g, t in zip(logits.argmax(-1), request.tokens))
        pairs = [(row[token].item(), value) for row, top in zip(logprobs, request.top) for token, value in top]
        prob_errors += [abs(math.exp(peft) - math.exp(engine)) for peft, engine in pairs]
        logprob_errors += [abs(peft - engine) for peft, engine in pairs]
    return Agreement(positions, same, max(prob_errors), sum(logprob_errors) / len(logprob_errors))


def _adapter(model, name: str | None):
    """A context with `name`'s adapter active in `model`, or with every adapter disabled for None (the base)."""
    if name is None:
        return model.disable_adapter()
    model.set_adapter(name)
    return contextlib.nullcontext()
