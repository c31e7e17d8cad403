"""A request as the engine thread sees it: its tokens, its KV blocks, where it stands."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .sampling import Logprobs, SamplingParams

if TYPE_CHECKING:
    from xgrammar import GrammarMatcher

    from ...adapters.manager import AdapterVersion


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id, a stop string, or the end of the guide's grammar
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the caller


@dataclass(eq=False)  # requests compare by identity
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V sit in the cache. After preemption this drops to 0 and prompt+output is recomputed.
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    adapter: AdapterVersion | None = None  # None: the base model
    # The device slot of every token of this request: -1 = base model, None = waiting for its adapter.
    adapter_slot: int | None = -1
    # With params.prompt_logprobs: those of prompt tokens 1.. so far (token 0 has none), sent with the first token.
    prompt_logprobs: list[Logprobs] = field(default_factory=list)
    # Fair admission: whose share this request's service counts against (a tenant, or an adapter's name, "" for the
    # base model), and that client's weight.
    client: str = ""
    weight: float = 1.0
    # Prefix caching: requests share cached blocks only with requests of the same salt (the tenant's and the caller's).
    cache_salt: str | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # of its leading full blocks, as far as computed yet
    num_cached_tokens: int | None = None  # prompt tokens found cached at its first admission
    # Structured outputs: where output_ids stand in the guide's grammar (kept through preemption, as output_ids are).
    matcher: GrammarMatcher | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed


@dataclass(frozen=True)
class TokenEvent:
    """One step's news for one request, sent from the engine thread to the request's consumer."""

    token_id: int | None  # None when the request ends without a new token (abort, error)
    finish_reason: FinishReason | None = None
    error: Exception | None = None  # raised to the caller
    logprobs: Logprobs | None = None
    prompt_logprobs: tuple[Logprobs, ...] | None = None  # with the first token, when asked
    cached_tokens: int | None = None  # with the first token: prompt tokens found in the prefix cache
