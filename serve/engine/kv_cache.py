"""The paged KV cache: fixed-size blocks of token slots, handed out to requests on demand.

Per layer, keys and values live in one flat tensor of `num_blocks * block_size` token slots; a request
holds a list of blocks and token `p` of it sits in slot `blocks[p // block_size] * block_size + p % block_size`.
The whole cache is allocated once from a memory budget; requests that do not fit wait in the scheduler. Requests
may share full blocks of a common prefix (`prefix_cache`); the allocator counts their holders.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from .block_allocator import BlockAllocator
from .host_memory import HUGE_PAGE, huge_page_empty

# The most KV memory the engine commits while idle past the blocks used so far (`PagedKVCache.commit_ahead`): a
# bound, so that an idle server with the default budget (most of the host's free memory) never takes it all at once
COMMIT_AHEAD_BYTES = 512 << 20
PAGE = 4096  # the smallest page: one write in each commits all of them

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'2GiB', '512MB', '1.5g', '1048576' -> bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a memory size: {text!r} (examples: 2GiB, 512MB, 1073741824)")
    number, unit, binary = match.groups()
    base = 1024 if binary or not unit else 1000
    return int(float(number) * base ** "bkmgt".index(unit.lower() or "b"))


def free_device_memory(device: torch.device) -> int:
    """Bytes the cache could take: free CUDA memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


class PagedKVCache:
    def __init__(self, shape: CacheShape, num_blocks: int, block_size: int, device: torch.device,
                 commit_ahead_bytes: int = COMMIT_AHEAD_BYTES):
        if num_blocks < 1:
            raise ValueError("the KV cache budget is too small for even one block")
        self.shape = shape
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.allocator = BlockAllocator(num_blocks)
        slots = num_blocks * block_size
        # per layer: [slots, kv_heads, head_dim]; left uninitialised on CUDA, lazily zeroed huge pages on the CPU
        # (pages are committed as they are used); attention only ever reads slots written earlier in the same or a
        # previous step
        whole = (2, shape.num_layers, slots, shape.num_kv_heads, shape.head_dim)
        lazy = torch.device(device).type == "cpu"
        if lazy:
            storage = huge_page_empty(whole, shape.dtype)
        else:
            storage = torch.empty(whole, dtype=shape.dtype, device=device)
        self.keys = list(storage[0])
        self.values = list(storage[1])
        # commit_ahead's state: slots committed so far in each layer's keys, then values (none to do on CUDA); the
        # slots used when it last ran; how far ahead to commit (the most a busy stretch has taken) and its bound
        self._committed = [0] * (2 * shape.num_layers) if lazy else []
        self._used_at_idle, self._ahead_slots = 0, 0
        self._max_ahead_slots = commit_ahead_bytes // shape.bytes_per_token
        self._piece_slots = max(1, HUGE_PAGE // (shape.bytes_per_token // (2 * shape.num_layers)))

    @classmethod
    def from_budget(
        cls, shape: CacheShape, budget_bytes: int, block_size: int, device: torch.device, max_blocks: int
    ) -> PagedKVCache:
        """As many blocks as `budget_bytes` holds, but never more than `max_blocks` (all that could be used)."""
        num_blocks = min(budget_bytes // (shape.bytes_per_token * block_size), max_blocks)
        return cls(shape, num_blocks, block_size, device)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def usage(self) -> float:
        return 1.0 - self.allocator.num_free / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_to_grow(self, blocks: list[int], num_tokens: int) -> int:
        """How many blocks to add to `blocks` for them to hold `num_tokens` tokens."""
        return max(0, self.blocks_needed(num_tokens) - len(blocks))

    def commit_ahead(self) -> bool:
        """Commit the next piece (a huge page of one layer's keys or values) of the never-used KV memory past the
        blocks used so far, as far ahead as the busiest stretch between two calls used fresh blocks (at most
        `commit_ahead_bytes`); False when there is none. The engine calls it while idle: fresh CPU memory is zeroed
        by the kernel on its first write, and without this a request that takes a block never used before waits for
        that (every new block while a prefix cache keeps the freed ones findable)."""
        used = self.allocator.used_below * self.block_size  # slots below were handed out: never written here
        self._ahead_slots = min(self._max_ahead_slots, max(self._ahead_slots, used - self._used_at_idle))
        self._used_at_idle = used
        limit = min(self.capacity_tokens, used + self._ahead_slots)
        for index, committed in enumerate(self._committed):
            start = max(committed, used)
            if start < limit:
                end = min(limit, start + self._piece_slots)
                layers = self.keys if index < len(self.keys) else self.values
                piece = layers[index % len(self.keys)][start:end].view(-1)  # [slots * kv_heads * head_dim]
                piece[:: PAGE // piece.element_size()].zero_()  # zeros on zeros: a write in each page commits it
                self._committed[index] = end
                return True
        return False
