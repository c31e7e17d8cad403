"""The flat token batch of one engine step and the metadata every layer reads.

A step is the concatenation of decodes (first) and prefill chunks of many requests, run as one sequence of T tokens
through the HF model. Built once per step, read by every layer: where each token's K/V goes in the paged cache,
which cached tokens each query attends to, which rows need logits, and the adapter slot of each token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import PAD_POS, AttentionGroup, GroupedAttention
from .kv_cache import PagedKVCache
from .request import Request


def completes(request: Request, n: int) -> bool:
    """Whether running `n` pending tokens of `request` reaches its last: the step samples its next token."""
    return request.num_computed + n == request.num_tokens


def is_decode(request: Request, n: int) -> bool:
    """Whether running `n` tokens of `request` is a decode: its one pending token, whose logits are sampled."""
    return n == 1 and completes(request, n)


@dataclass(frozen=True)
class StepRows:
    """The rows of a step's flat batch whose logits it computes: N rows sampled, then P prompt rows scored."""

    indices: list[int]  # [N + P] rows of the flat batch
    sampled: list[Request]  # [N] the requests due a token, in the order of the rows
    prompt_rows: list[tuple[Request, int]]  # [P] (request, prompt position) whose next prompt token is scored


def step_rows(entries: list[tuple[Request, int]]) -> StepRows:
    """The logits rows of a step of `entries` (request, tokens run), in the order of its flat batch: a request's last
    token when it completes the request, and the prompt positions whose next token's log-probability is asked for
    and not scored yet."""
    sampled_rows: list[int] = []
    sampled: list[Request] = []
    prompt_indices: list[int] = []
    prompt_rows: list[tuple[Request, int]] = []
    row0 = 0
    for request, n in entries:
        start = request.num_computed
        if completes(request, n):
            sampled_rows.append(row0 + n - 1)
            sampled.append(request)
        if request.params.prompt_logprobs is not None:
            for position in range(max(start, len(request.prompt_logprobs)), min(start + n, len(request.prompt_ids) - 1)):
                prompt_rows.append((request, position))
                prompt_indices.append(row0 + position - start)
        row0 += n
    return StepRows(sampled_rows + prompt_indices, sampled, prompt_rows)


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    adapter_slots: list[int]  # [T] adapter slot per token, -1 = base model
    attention: GroupedAttention
    rows: StepRows
    logits_rows: torch.Tensor  # [N + P] rows.indices on the device


def _slots(blocks: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position. blocks: [..., max_blocks] block table; positions: [..., n]."""
    return torch.gather(blocks, -1, positions // block_size) * block_size + positions % block_size


def build_step(
    entries: list[tuple[Request, int]],
    cache: PagedKVCache,
    device: torch.device,
    attention_kernel: Callable | None = None,
) -> StepBatch:
    """entries: (request, number of its pending tokens to run now). Decodes go first.
    attention_kernel: the compiled attention for every group (None: SDPA)."""
    entries = sorted(entries, key=lambda e: not is_decode(*e))  # stable: keeps the scheduler's order within each kind
    bs = cache.block_size
    token_ids: list[int] = []
    positions: list[torch.Tensor] = []
    slot_parts: list[torch.Tensor] = []
    adapter_slots: list[int] = []
    groups: list[AttentionGroup] = []

    decodes = [request for request, n in entries if is_decode(request, n)]
    if decodes:
        blocks = _block_table([r.blocks for r in decodes])
        ctx = torch.tensor([r.num_computed + 1 for r in decodes])  # [B] context length incl. the new token
        query_pos = (ctx - 1)[:, None]  # [B, 1]
        key_pos = torch.arange(int(ctx.max()))[None, :].expand(len(decodes), -1)  # [B, L]
        valid = key_pos < ctx[:, None]
        # padding reads the query's own slot, just written, so nothing uninitialised enters attention
        kv_index = _slots(blocks, torch.minimum(key_pos, query_pos), bs)
        groups.append(AttentionGroup(slice(0, len(decodes)), kv_index, query_pos, torch.where(valid, key_pos, PAD_POS)))
        positions.append(query_pos[:, 0])
        slot_parts.append(torch.gather(kv_index, 1, query_pos)[:, 0])

    for request, n in entries:
        start = request.num_computed
        row0 = len(token_ids)
        token_ids.extend(request.all_ids[start : start + n])
        adapter_slots.extend([request.adapter_slot] * n)
        if is_decode(request, n):
            continue
        blocks = torch.tensor(request.blocks)
        key_pos = torch.arange(start + n)  # [L] the whole context, the new chunk included
        kv_index = _slots(blocks, key_pos, bs)
        query_pos = key_pos[start:]
        groups.append(AttentionGroup(slice(row0, row0 + n), kv_index[None], query_pos[None], key_pos[None]))
        positions.append(query_pos)
        slot_parts.append(kv_index[start:])

    def on_device(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    for g in groups:
        g.kv_index, g.query_pos, g.key_pos = on_device(g.kv_index), on_device(g.query_pos), on_device(g.key_pos)
    rows = step_rows(entries)
    return StepBatch(
        input_ids=on_device(torch.tensor(token_ids)[None]),
        position_ids=on_device(torch.cat(positions)[None]),
        adapter_slots=adapter_slots,
        attention=GroupedAttention(on_device(torch.cat(slot_parts)), groups, attention_kernel),
        rows=rows,
        logits_rows=on_device(torch.tensor(rows.indices, dtype=torch.long)),
    )


def _block_table(block_lists: list[list[int]]) -> torch.Tensor:
    """[B, max_blocks] padded with block 0 (never read: padding positions are clamped to real ones)."""
    width = max(len(b) for b in block_lists)
    return torch.tensor([b + [0] * (width - len(b)) for b in block_lists])
