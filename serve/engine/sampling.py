"""Per-request sampling parameters and the batched sampler.

Every request carries its own SamplingParams; the sampler turns one row of logits per request that is due a
new token into that token. Greedy rows are decided together by one argmax; sampled rows each use the
request's own torch.Generator, so a seeded request gives the same tokens whatever it is batched with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


MIN_TEMPERATURE = 1e-5


class SamplingParams(BaseModel):
    """What a request asks of generation. temperature 0 (anything below MIN_TEMPERATURE) means greedy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 disables top-k")
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20, description="also return the sampled token's "
                                 "log-probability and this many most likely alternatives")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value):
        if isinstance(value, str):
            value = (value,)
        value = tuple(value or ())
        if any(not s for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE dividing the logits overflows fp32 (1e-308 is 0 there): decode greedily, as vLLM does.
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own random stream: seeded when asked, from the OS otherwise; None when greedy."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class Logprobs:
    """The sampled token's log-probability under the model (before temperature), and the top alternatives."""

    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first


def sample(
    logits: torch.Tensor,  # [N, vocab] one row per request due a token
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[Logprobs | None]]:
    """Pick one token per row; with it, log-probabilities for the rows that asked. One host sync per step."""
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)
    if greedy_rows:
        rows = torch.tensor(greedy_rows, device=logits.device)
        tokens[rows] = logits[rows].argmax(dim=-1)
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = _sample_row(logits[i].float(), p, generators[i])
    chosen = tokens.tolist()
    return chosen, [_logprobs(logits[i], chosen[i], p.logprobs) if p.logprobs is not None else None
                    for i, p in enumerate(params)]


def _logprobs(logits: torch.Tensor, token: int, top: int) -> Logprobs:
    """logits: [vocab]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [vocab]
    values, ids = torch.topk(logprobs, top) if top else (logprobs[:0], logprobs[:0].long())
    return Logprobs(float(logprobs[token]), tuple(zip(ids.tolist(), values.tolist())))


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """logits: [vocab] fp32. Temperature, then top-k, then top-p (nucleus), then a draw."""
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        outside[0] = False  # even where top_p rounds to 0 in fp32 (below about 1e-45)
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]
