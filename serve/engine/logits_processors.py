"""Logits processors: logit_bias, the repetition, frequency and presence penalties, and min_tokens.

They rewrite the sampled rows' logits in place, after the model and before the grammar mask and the sampler
(temperature, top-k, top-p), in Hugging Face generate's order (vLLM's gives the same logits):

    1. logit_bias       logit[t] += bias[t]
    2. repetition       for t in prompt or output: logit[t] / p where logit[t] > 0, logit[t] * p otherwise
    3. frequency, presence (output tokens only, c[t] = times t was generated):
                        logit[t] -= frequency_penalty * c[t] + presence_penalty * (c[t] > 0)
    4. min_tokens       while fewer than min_tokens tokens are out, the tokens that would end the request
                        (its stop_token_ids, and EOS unless ignore_eos) are set to -inf

The log-probabilities a request asks for are taken from these processed logits (before temperature): those of the
distribution the token was drawn from. A step where no row asks for any of this does no tensor work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .request import Request


@torch.inference_mode()  # the model's logits are inference tensors: only written in place under inference mode
def process_logits(
    logits: torch.Tensor,  # [N, vocab] one row per request due a token, bf16 or fp32; rewritten in place
    requests: list[Request],
    eos_ids: frozenset[int],
) -> None:
    """Apply each request's logit_bias, penalties and min_tokens to its row. The rows that ask are processed
    together in fp32 and written back in the logits' dtype."""
    rows = [i for i, request in enumerate(requests) if _asks(request)]
    if not rows:
        return
    asking = [requests[i] for i in rows]
    index = torch.tensor(rows, device=logits.device)  # [n]
    processed = logits.index_select(0, index).float()  # [n, vocab]
    _add_bias(processed, asking)
    _penalise_repetition(processed, asking)
    _penalise_output(processed, asking)
    _bar_endings(processed, asking, eos_ids)
    logits.index_copy_(0, index, processed.to(logits.dtype))


def _asks(request: Request) -> bool:
    params = request.params
    return (bool(params.logit_bias) or params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0 or len(request.output_ids) < params.min_tokens)


def _add_bias(logits: torch.Tensor, requests: list[Request]) -> None:
    """logits [n, vocab] += each row's logit_bias."""
    entries = [(row, token, bias) for row, request in enumerate(requests) for token, bias in request.params.logit_bias]
    if not entries:
        return
    rows, tokens, biases = zip(*entries)
    device = logits.device
    logits.index_put_((torch.tensor(rows, device=device), torch.tensor(tokens, device=device)),
                      torch.tensor(biases, dtype=logits.dtype, device=device), accumulate=True)


def _penalise_repetition(logits: torch.Tensor, requests: list[Request]) -> None:
    """Hugging Face's repetition penalty on logits [n, vocab] over each row's prompt and output tokens; rows without
    one count no tokens (and a penalty of 1 would change nothing: x / 1 and x * 1 are exact)."""
    penalties = [request.params.repetition_penalty for request in requests]
    if all(p == 1.0 for p in penalties):
        return
    seen = _token_counts([request.all_ids if p != 1.0 else [] for request, p in zip(requests, penalties)],
                         logits.shape[-1], logits.device) > 0  # [n, vocab]
    penalty = torch.tensor(penalties, dtype=logits.dtype, device=logits.device)[:, None]  # [n, 1]
    # divide rather than multiply by 1 / p: the same rounding as Hugging Face's processor
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits.copy_(torch.where(seen, penalised, logits))


def _penalise_output(logits: torch.Tensor, requests: list[Request]) -> None:
    """OpenAI's frequency and presence penalties on logits [n, vocab], counted over each row's output tokens."""
    params = [request.params for request in requests]
    if all(p.frequency_penalty == 0.0 and p.presence_penalty == 0.0 for p in params):
        return
    counts = _token_counts([request.output_ids for request in requests], logits.shape[-1], logits.device)  # [n, vocab]
    frequency = torch.tensor([p.frequency_penalty for p in params], device=logits.device)[:, None]  # [n, 1]
    presence = torch.tensor([p.presence_penalty for p in params], device=logits.device)[:, None]  # [n, 1]
    logits -= frequency * counts
    logits -= presence * (counts > 0)


def _bar_endings(logits: torch.Tensor, requests: list[Request], eos_ids: frozenset[int]) -> None:
    """-inf on logits [n, vocab] for the tokens that would end a request still short of its min_tokens."""
    vocab = logits.shape[-1]
    entries = []
    for row, request in enumerate(requests):
        params = request.params
        if len(request.output_ids) < params.min_tokens:
            endings = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
            # a stop id outside the vocabulary can never be sampled: nothing to bar
            entries += [(row, token) for token in endings if 0 <= token < vocab]
    if entries:
        rows, tokens = zip(*entries)
        logits[torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device)] = float("-inf")


def _token_counts(id_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[n, vocab] fp32: how often each token id occurs in each row's list."""
    # padded with `vocab`, counted in an extra column that is dropped; filled through numpy: for long prompts ten
    # times faster than torch.tensor on nested lists
    padded = np.full((len(id_lists), max(map(len, id_lists))), vocab, dtype=np.int64)  # [n, width]
    for row, ids in enumerate(id_lists):
        padded[row, : len(ids)] = ids
    index = torch.from_numpy(padded).to(device)  # [n, width]
    counts = torch.zeros(len(id_lists), vocab + 1, device=device)  # [n, vocab + 1]
    counts.scatter_add_(1, index, torch.ones(index.shape, device=device))
    return counts[:, :vocab]
