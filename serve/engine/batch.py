"""The flat token batch of one engine step and the metadata every layer reads.

A step is the concatenation of single-token entries (decodes, first) and multi-token prefill chunks of many
requests, run as one sequence of T tokens through the HF model. Built once per step, read by every layer:
where each token's K/V goes in the paged cache, which cached tokens each query attends to, which rows need
logits, and the adapter slot of each token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .kv_cache import PagedKVCache
from .request import Request

# Key position given to padding in a gathered context: larger than any query position, so the causal
# test `key_pos <= query_pos` masks it out.
_PAD_POS = torch.iinfo(torch.int32).max


@dataclass
class AttentionGroup:
    """Queries `rows` of the flat batch attending to gathered cache slots; B sequences, Q queries, L keys each."""

    rows: slice  # the group's tokens are contiguous in the flat batch
    kv_index: torch.Tensor  # [B, L] cache slot of each context token (padding: the query's own slot)
    query_pos: torch.Tensor  # [B, Q] absolute position of each query token
    key_pos: torch.Tensor  # [B, L] absolute position of each context token (padding: _PAD_POS)
    decode: bool = False  # one query per sequence, and column j of kv_index is position j
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.kv_index.shape[0]

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, Q, L] bool, True where the query may attend. Built once per step per window size."""
        if sliding_window not in self._masks:
            q = self.query_pos[:, :, None]
            k = self.key_pos[:, None, :]
            allowed = k <= q
            if sliding_window is not None:
                allowed &= k > q - sliding_window
            self._masks[sliding_window] = allowed[:, None]
        return self._masks[sliding_window]


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    slot_mapping: torch.Tensor  # [T] cache slot each token's K/V is written to
    logits_rows: torch.Tensor  # [N + P] rows of the flat batch: N whose next token is sampled, then P prompt rows
    adapter_slots: list[int]  # [T] adapter slot per token, -1 = base model
    groups: list[AttentionGroup]
    kv_cache: PagedKVCache
    # the compiled CPU decode attention (`decode_attention` of the CPU ops) for the decode group, or None: SDPA
    decode_kernel: Callable | None
    # the requests due a token, in the order of logits_rows
    sampled: list[Request]
    # the P prompt rows' (request, prompt position) whose next prompt token's log-probability is asked for
    prompt_rows: list[tuple[Request, int]]


def _slots(blocks: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position. blocks: [..., max_blocks] block table; positions: [..., n]."""
    return torch.gather(blocks, -1, positions // block_size) * block_size + positions % block_size


def build_step(
    entries: list[tuple[Request, int]],
    cache: PagedKVCache,
    device: torch.device,
    decode_kernel: Callable | None = None,
) -> StepBatch:
    """entries: (request, number of its pending tokens to run now). Decode entries (1 token) go first.
    decode_kernel: the decode group's attention kernel (None: SDPA for every group)."""
    entries = sorted(entries, key=lambda e: e[1] != 1)  # stable: keeps the scheduler's order within each kind
    bs = cache.block_size
    token_ids: list[int] = []
    positions: list[torch.Tensor] = []
    slot_parts: list[torch.Tensor] = []
    logits_rows: list[int] = []
    sampled: list[Request] = []
    prompt_rows: list[tuple[Request, int]] = []
    prompt_logits_rows: list[int] = []
    adapter_slots: list[int] = []
    groups: list[AttentionGroup] = []

    decodes = [(r, n) for r, n in entries if n == 1]
    if decodes:
        blocks = _block_table([r.blocks for r, _ in decodes])
        ctx = torch.tensor([r.num_computed + 1 for r, _ in decodes])  # [B] context length incl. the new token
        query_pos = (ctx - 1)[:, None]  # [B, 1]
        key_pos = torch.arange(int(ctx.max()))[None, :].expand(len(decodes), -1)  # [B, L]
        valid = key_pos < ctx[:, None]
        # padding reads the query's own slot, just written, so nothing uninitialised enters attention
        kv_index = _slots(blocks, torch.minimum(key_pos, query_pos), bs)
        groups.append(
            AttentionGroup(
                slice(0, len(decodes)), kv_index, query_pos, torch.where(valid, key_pos, _PAD_POS), decode=True
            )
        )
        positions.append(query_pos[:, 0])
        slot_parts.append(torch.gather(kv_index, 1, query_pos)[:, 0])

    for request, n in entries:
        start = request.num_computed
        row0 = len(token_ids)
        token_ids.extend(request.all_ids[start : start + n] if n > 1 else [request.all_ids[start]])
        adapter_slots.extend([request.adapter_slot] * n)
        if start + n == request.num_tokens:
            logits_rows.append(row0 + n - 1)
            sampled.append(request)
        if request.params.prompt_logprobs is not None:  # positions whose next prompt token is not scored yet
            for position in range(max(start, len(request.prompt_logprobs)), min(start + n, len(request.prompt_ids) - 1)):
                prompt_rows.append((request, position))
                prompt_logits_rows.append(row0 + position - start)
        if n == 1:
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
    return StepBatch(
        input_ids=on_device(torch.tensor(token_ids)[None]),
        position_ids=on_device(torch.cat(positions)[None]),
        slot_mapping=on_device(torch.cat(slot_parts)),
        logits_rows=on_device(torch.tensor(logits_rows + prompt_logits_rows, dtype=torch.long)),
        adapter_slots=adapter_slots,
        groups=groups,
        kv_cache=cache,
        decode_kernel=decode_kernel,
        sampled=sampled,
        prompt_rows=prompt_rows,
    )


def _block_table(block_lists: list[list[int]]) -> torch.Tensor:
    """[B, max_blocks] padded with block 0 (never read: padding positions are clamped to real ones)."""
    width = max(len(b) for b in block_lists)
    return torch.tensor([b + [0] * (width - len(b)) for b in block_lists])
