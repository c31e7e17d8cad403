"""Host memory on transparent huge pages, for what every CPU engine step reads.

A decode step on the CPU reads all of the model's weights, the adapter slot buffers and the live part of the KV
cache: tens of MB over thousands of 4 KiB pages, more than the TLB covers, and each tensor allocated on its own.
Packed into one buffer that the kernel backs with 2 MiB pages (madvise MADV_HUGEPAGE), a step pays fewer page
walks (loadtest/RESULTS.md, "The CPU kernels' design figures").

Where the OS has no transparent huge pages (not Linux, or THP set to `never`), the same buffers simply use
ordinary pages.
"""

from __future__ import annotations

import itertools
import math
import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor [nbytes] starting on a 2 MiB boundary, in memory advised for huge pages."""
    # Private anonymous memory (a shared mapping would be shmem, which THP leaves alone), zeroed and committed page
    # by page on first touch; whole huge pages from a 2 MiB boundary, with one page more to find that boundary in.
    length = (math.ceil(nbytes / HUGE_PAGE) + 1) * HUGE_PAGE
    mapping = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


def huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed contiguous CPU tensor of `shape` on huge pages."""
    return huge_page_buffer(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)


def pack_into_huge_pages(module: nn.Module) -> int:
    """Move every parameter and buffer of a CPU module into one huge-page buffer; returns the bytes moved, 0 when
    the module holds tensors it cannot move (on another device, or subclasses such as quantized weights).

    Values, shapes, strides and shared storage (tied weights, views of one tensor) stay as they were; modules that
    cache views of their tensors refresh them in `_apply`, which this goes through (as `.to()` does).
    """
    tensors = list(itertools.chain(module.parameters(), module.buffers()))
    if any(t.device.type != "cpu" or type(t) not in (torch.Tensor, nn.Parameter) for t in tensors):
        return 0
    offsets: dict[int, int] = {}  # storage address -> its byte offset in the buffer
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in offsets:
            offsets[storage.data_ptr()] = total
            total += -(-storage.nbytes() // 64) * 64  # cache-line aligned
    buffer = huge_page_buffer(total)
    copied: set[int] = set()

    def moved(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in offsets:  # moved already: a tied parameter seen a second time
            return t
        start = offsets[storage.data_ptr()]
        region = buffer[start : start + storage.nbytes()]
        if storage.data_ptr() not in copied:
            region.copy_(torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),)))
            copied.add(storage.data_ptr())
        typed = region.view(t.dtype)
        return typed.as_strided(t.shape, t.stride(), typed.storage_offset() + t.storage_offset())

    module._apply(moved)
    return total
