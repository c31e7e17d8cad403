"""Per-request sampling parameters and the batched sampler.

Every request carries its own SamplingParams; the sampler turns one row of logits per request that is due a
new token into that token. Greedy rows are decided together by one argmax, sampled rows together by one masked
draw whose noise comes from each request's own torch.Generator, so a seeded request gives the same tokens whatever
it is batched with; the step's tokens (and log-probabilities) reach the host in one transfer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...kernels.cpu_build import KERNEL_DTYPES, cpu_ops
from .guide import Guide


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
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20, description="also return each prompt token's "
                                        "log-probability given the tokens before it, and this many alternatives")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="subtracted from the logit of every "
                                    "token already generated (OpenAI's)")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, description="subtracted once per time a token "
                                     "was already generated (OpenAI's)")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0, description="divides the positive (multiplies "
                                      "the negative) logits of tokens in the prompt or the output (Hugging Face's)")
    logit_bias: tuple[tuple[int, float], ...] = Field(default=(), description="(token id, bias in [-100, 100]) "
                                                      "added to the logits")
    min_tokens: int = Field(default=0, ge=0, description="end-of-sequence and stop token ids are barred until this "
                            "many tokens are generated")
    guide: Guide | None = Field(default=None, description="what the output must match (structured outputs)")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value):
        if isinstance(value, str):
            value = (value,)
        value = tuple(value or ())
        if any(not s for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value):
        # OpenAI's limits: at most 300 tokens, biases in [-100, 100]; the vocabulary's end is the engine's to check
        if len(value) > 300:
            raise ValueError(f"logit_bias may name at most 300 tokens, not {len(value)}")
        tokens = [token for token, _ in value]
        if any(token < 0 for token in tokens):
            raise ValueError("logit_bias token ids must be non-negative")
        if len(set(tokens)) < len(tokens):
            raise ValueError("logit_bias names a token id more than once")
        if not all(-100.0 <= bias <= 100.0 for _, bias in value):
            raise ValueError("logit_bias values must lie in [-100, 100]")
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
    """Pick one token per row; with it, log-probabilities for the rows that asked. Greedy rows by one argmax,
    sampled rows together (`_sample_rows`); everything the host needs comes back in one transfer."""
    tokens = greedy_tokens(logits)  # [N]: greedy everywhere, sampled rows overwritten below
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)  # [n]
        chosen = _sample_rows(logits.index_select(0, rows).float(), [params[i] for i in sampled],
                              [generators[i] for i in sampled])
        tokens.index_copy_(0, rows, chosen)
    asking = [i for i, p in enumerate(params) if p.logprobs is not None]
    tops = [params[i].logprobs for i in asking]
    parts = [tokens.double()]
    if asking:
        rows = torch.tensor(asking, device=logits.device)  # [m]
        parts.append(_scores(logits.index_select(0, rows), tokens.index_select(0, rows), max(tops)))
    host = torch.cat(parts).tolist()  # the one transfer: ids are exact in float64
    logprobs: list[Logprobs | None] = [None] * len(params)
    for i, row_logprobs in zip(asking, _unpack(host[len(params) :], tops)):
        logprobs[i] = row_logprobs
    return [int(t) for t in host[: len(params)]], logprobs


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax, [N, vocab] -> [N] int64: on the CPU through the compiled ops (torch's argmax there is a
    scalar scan, milliseconds a step over a large vocabulary: loadtest/RESULTS.md, "Greedy tokens, and the AMX host
    again"), elsewhere torch's, from float32."""
    compiled = cpu_ops() if logits.device.type == "cpu" and logits.dtype in KERNEL_DTYPES else None
    if compiled is None or logits.stride(-1) != 1:
        return logits.float().argmax(dim=-1)
    return compiled.greedy_tokens(logits)


def score_tokens(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[Logprobs]:
    """Each row's log-probability of its token (under the model, no temperature) and its `tops[i]` most likely
    alternatives. logits: [m, vocab]; one transfer."""
    targets = torch.tensor(tokens, device=logits.device)  # [m]
    return _unpack(_scores(logits, targets, max(tops)).tolist(), tops)


def _scores(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> torch.Tensor:
    """[m * (1 + 2 top)] float64: each row's logprob of its token [m], then the top ids [m, top] and logprobs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [m, vocab]
    own = logprobs.gather(1, tokens[:, None])  # [m, 1]
    best, best_ids = torch.topk(logprobs, top, dim=-1)  # [m, top]
    return torch.cat([own.double().flatten(), best_ids.double().flatten(), best.double().flatten()])


def _unpack(values: list[float], tops: list[int]) -> list[Logprobs]:
    """`_scores`' values on the host as one Logprobs per row, row i keeping its tops[i] alternatives."""
    m, top = len(tops), max(tops, default=0)
    own, ids, best = values[:m], values[m : m + m * top], values[m + m * top :]
    return [Logprobs(own[j], tuple((int(t), v) for t, v in zip(ids[j * top : j * top + k], best[j * top : j * top + k])))
            for j, k in enumerate(tops)]


def _sample_rows(
    logits: torch.Tensor,  # [n, vocab] fp32
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> torch.Tensor:
    """[n] tokens: temperature, then top-k, then top-p (nucleus) per row, then a draw by each row's own generator.

    The draw is an exponential race, argmax_j p_j / E_j with E_j ~ Exp(1) from the row's generator: token j wins with
    probability p_j, and a row's tokens depend only on its own logits and generator, never on its batch."""
    device = logits.device
    logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(top_k) < vocab:
        kth = logits.sort(dim=-1, descending=True).values.gather(1, torch.tensor(top_k, device=device)[:, None] - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # [n, vocab]
    probs = torch.softmax(logits, dim=-1)
    if min(p.top_p for p in params) < 1.0:
        top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]  # [n, 1]
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        outside[:, 0] = False  # even where top_p rounds to 0 in fp32 (below about 1e-45)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(outside, 0.0))
    races = torch.empty_like(probs)
    for row, generator in enumerate(generators):
        races[row].exponential_(generator=generator)
    return (probs / races).argmax(dim=-1)
