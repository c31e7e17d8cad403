"""The KV cache's blocks: who holds each, and which full blocks can be found again by the hash of their contents.

A block is held by the requests that list it (its reference count); at zero it is free. A free block that carries a
hash (`register`) stays findable (`find`) until an allocation needs its memory: free blocks without a hash go first,
then hashed ones, least recently freed first. Handing a found block to a request (`share`) takes it out of the free
ones if nobody held it.
"""

from __future__ import annotations

from collections.abc import Iterable


class BlockAllocator:
    """Reference-counted block ids with a hash index over full blocks. O(1) per block."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks  # requests holding each block
        self.hashes: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self._empty = list(range(num_blocks - 1, -1, -1))  # free, no hash: taken first, from the end
        self._cached: dict[int, None] = {}  # free with a hash, least recently freed first
        self.used_below = 0  # every block handed out so far has a lower id (the never-used ones are taken in order)

    @property
    def num_free(self) -> int:
        return len(self._empty) + len(self._cached)

    @property
    def num_cached_free(self) -> int:
        """Free blocks still findable by their hash."""
        return len(self._cached)

    def allocate(self, count: int) -> list[int]:
        """`count` blocks held once each: blocks without a hash first, then the least recently freed hashed ones
        (their hash is forgotten)."""
        if count > self.num_free:
            raise MemoryError(f"asked for {count} KV blocks, {self.num_free} free")
        unhashed = len(self._empty) - min(count, len(self._empty))
        taken = self._empty[unhashed:]
        del self._empty[unhashed:]
        for _ in range(count - len(taken)):
            block = next(iter(self._cached))
            del self._cached[block]
            del self.by_hash[self.hashes[block]]
            self.hashes[block] = None
            taken.append(block)
        for block in taken:
            self.refs[block] = 1
        self.used_below = max([self.used_below, *(block + 1 for block in taken)])
        return taken

    def free(self, blocks: list[int]) -> None:
        """One holder fewer for each block. Freed last to first, so a prompt's tail is forgotten before its head
        (a block is only found after every block before it)."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.hashes[block] is None:
                    self._empty.append(block)
                else:
                    self._cached[block] = None

    def find(self, hashes: Iterable[bytes]) -> list[int]:
        """The blocks registered under the leading `hashes`, up to the first that is not found."""
        found = []
        for digest in hashes:
            block = self.by_hash.get(digest)
            if block is None:
                break
            found.append(block)
        return found

    def num_idle(self, blocks: list[int]) -> int:
        """How many of `blocks` are free: sharing them takes that many from the free blocks."""
        return sum(1 for block in blocks if self.refs[block] == 0)

    def share(self, blocks: list[int]) -> None:
        """One holder more for each (found) block."""
        for block in blocks:
            if self.refs[block] == 0:
                del self._cached[block]
            self.refs[block] += 1

    def register(self, block: int, digest: bytes) -> None:
        """Make a full, computed block findable under `digest`; a block already registered under it stays the one
        found (this one is a duplicate and goes back unhashed when freed)."""
        if digest not in self.by_hash and self.hashes[block] is None:
            self.by_hash[digest] = block
            self.hashes[block] = digest
