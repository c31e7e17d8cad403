"""Automatic prefix caching: a request whose leading full blocks of tokens another request computed before shares
those blocks instead of computing them again.

Every full block of a request's tokens is named by a hash chain:

    hash[-1] = H(the model it runs on, its salt)     the base model, or an adapter: its name and the read of its weights
    hash[i]  = H(hash[i - 1], the token ids of block i)

so a block is found only by a request with the same weights, the same salt (its tenant's and its own `cache_salt`) and
the same tokens up to the end of that block. An adapter is named by the read that loaded its weights, a number never
given twice in a process: unloading, reloading or replacing it under the same name, or reading changed files again,
never finds the blocks of the weights before. H is SHA-256: one who could make two prefixes collide could read
another's prompt through the time to its own first token. A block becomes findable once computed (`publish`); the
allocator keeps freed blocks findable until it needs their memory.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from typing import TYPE_CHECKING

from .kv_cache import PagedKVCache
from .request import Request

if TYPE_CHECKING:
    from ...adapters.manager import AdapterVersion


def root_hash(adapter: AdapterVersion | None, salt: str | None) -> bytes:
    """What a request's hash chain starts from: the model it runs on and its salt."""
    model = ["base"] if adapter is None else ["lora", adapter.name, adapter.read_id]
    return hashlib.sha256(json.dumps([*model, salt]).encode()).digest()


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The hash of a full block: its parent's and its token ids."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class PrefixCache:
    """Finds a request's cached leading blocks, hands them over, and publishes the blocks requests fill; counts the
    tokens looked up (`queries`) and found (`hits`)."""

    def __init__(self, cache: PagedKVCache, enabled: bool = True):
        self.cache = cache
        self.enabled = enabled
        self.queries = 0
        self.hits = 0

    def find(self, request: Request) -> list[int]:
        """The cached blocks that can stand for the leading tokens of `request` (which holds none): every leading full
        block found, but never the block of its last token, whose logits must be computed; none when it asks for the
        prompt's log-probabilities, which then come from every prompt token computed, exactly as without the cache."""
        if not self._reads(request):
            return []
        usable = (request.num_tokens - 1) // self.cache.block_size
        return self.cache.allocator.find(self._hashes(request, usable))

    def take(self, request: Request, blocks: list[int]) -> None:
        """Admit `request`, which holds no blocks, with the `blocks` found for it: they become its first blocks, their
        tokens computed. Its first admission fixes how many prompt tokens it found cached."""
        self.cache.allocator.share(blocks)
        request.blocks = list(blocks)
        request.num_computed = len(blocks) * self.cache.block_size
        if request.num_cached_tokens is None:
            request.num_cached_tokens = request.num_computed
        if self._reads(request):
            self.queries += request.num_tokens
            self.hits += request.num_computed

    def publish(self, request: Request, start: int) -> None:
        """Make findable the blocks of `request` that its tokens from `start` to `num_computed` filled."""
        first, end = start // self.cache.block_size, request.num_computed // self.cache.block_size
        if not self.enabled or end == first:
            return
        for index, digest in enumerate(self._hashes(request, end)[first:], first):
            self.cache.allocator.register(request.blocks[index], digest)

    def _reads(self, request: Request) -> bool:
        """Whether `request` looks up the cache: caching is on and it asks for no prompt log-probabilities."""
        return self.enabled and request.params.prompt_logprobs is None

    def _hashes(self, request: Request, count: int) -> list[bytes]:
        """The chain hashes of the first `count` full blocks of the request's tokens, kept on the request."""
        hashes, size = request.block_hashes, self.cache.block_size
        if len(hashes) < count:
            ids = request.all_ids
            parent = hashes[-1] if hashes else root_hash(request.adapter, request.cache_salt)
            for index in range(len(hashes), count):
                parent = block_hash(parent, ids[index * size : (index + 1) * size])
                hashes.append(parent)
        return hashes[:count]
