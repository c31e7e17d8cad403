"""The persistent inputs of a decode step: buffers allocated once and rewritten in place, one copy a step.

A decode-only step (every running request due one token) runs from fixed tensors, so a CUDA graph captured over
them replays for any batch up to its bucket: token ids, positions, the KV slot each new token is written to, the
block tables and context lengths the paged decode attention reads, and the LoRA token -> slot metadata. All of them
are int32 views of one device buffer, filled from one pinned host buffer by one copy. Rows past the batch, up to
the bucket, are padding: token 0 at position 0, written to a reserved scratch block of the KV cache and attending
to it alone, adapter slot -1.

The LoRA metadata is the forward context's, read by eager steps too: sized for the larger of a step and a bucket, it
copies its own part of the buffer to the device on an eager step (`LoraMeta.update`). With `lora_rows` a second one
groups the logits rows for the output head's LoRA: on a decode step every row is a logits row, so it holds the same.
"""

from __future__ import annotations

import torch

from ...kernels.lora import LoraMeta
from ...kernels.paged_decode import PagedDecode
from .attention import PagedDecodeAttention
from .kv_cache import PagedKVCache
from .request import Request


class DecodeInputs:
    def __init__(self, max_seqs: int, cache: PagedKVCache, max_model_len: int, device: torch.device,
                 kernel: PagedDecode, num_slots: int, lora_tokens: int, lora_rows: bool = False):
        """kernel: the paged decode attention for the device; num_slots: adapter slots (0: no LoRA metadata);
        lora_tokens: tokens the LoRA metadata holds, >= max_seqs; lora_rows: the logits rows' metadata too."""
        self.max_seqs, self.cache, self.kernel = max_seqs, cache, kernel
        self.max_blocks = cache.blocks_needed(max_model_len)
        self.scratch_block = cache.allocator.allocate(1)[0]  # padding rows write and read here, never a request
        sizes = [max_seqs] * 4 + [max_seqs * self.max_blocks]
        metas = (1 + lora_rows) if num_slots else 0
        lora_size = LoraMeta.size(lora_tokens, num_slots)
        on_cuda = device.type == "cuda"
        self._staging = torch.zeros(sum(sizes) + metas * lora_size, dtype=torch.int32, pin_memory=on_cuda)
        self._packed = self._staging.to(device) if on_cuda else self._staging.clone()  # copied like the device's
        self._host = self._staging.numpy()
        fields = self._packed[: sum(sizes)].split(sizes)
        self.input_ids, self.positions, self.slot_mapping, self.context_lens = fields[:4]  # [max_seqs] int32 each
        self.block_tables = fields[4].view(max_seqs, self.max_blocks)  # [max_seqs, max_blocks] int32
        self.slot_mapping_long = torch.zeros(max_seqs, dtype=torch.int64, device=device)  # index_copy_ wants int64
        lora_start = sum(sizes)

        def meta(index: int) -> LoraMeta | None:  # the index-th LoRA metadata's part of the buffers
            if index >= metas:
                return None
            part = slice(lora_start + index * lora_size, lora_start + (index + 1) * lora_size)
            return LoraMeta(lora_tokens, num_slots, device, storage=(self._staging[part], self._packed[part]))

        self.lora_meta, self.lora_rows = meta(0), meta(1)

    def write(self, requests: list[Request], bucket: int) -> bool:
        """Fill rows 0..B-1 with the requests' next token (their blocks must cover it) and rows B..bucket-1 with
        padding, then copy everything to the device at once. Returns whether a token uses an adapter."""
        count, size, width = len(requests), self.cache.block_size, self.max_blocks
        seqs = self.max_seqs
        host = self._host
        ids, positions, slots, lengths = (host[i * seqs : i * seqs + bucket] for i in range(4))
        tables = host[4 * seqs : 4 * seqs + seqs * width].reshape(seqs, width)
        for row, request in enumerate(requests):
            position = request.num_computed
            blocks = request.blocks
            ids[row], positions[row], lengths[row] = request.all_ids[position], position, position + 1
            slots[row] = blocks[position // size] * size + position % size
            tables[row, : len(blocks)] = blocks
        ids[count:], positions[count:], lengths[count:] = 0, 0, 1
        slots[count:] = self.scratch_block * size
        tables[count:bucket, 0] = self.scratch_block
        active = self.write_lora([r.adapter_slot for r in requests] + [-1] * (bucket - count))
        self.copy()
        return active

    def write_lora(self, token_slots: list[int]) -> bool:
        """The LoRA metadata of a decode step's rows (tokens and logits rows alike) into the host buffer; returns
        whether a token uses an adapter."""
        if self.lora_rows is not None:
            self.lora_rows.write(token_slots)
        return self.lora_meta is not None and self.lora_meta.write(token_slots)

    def copy(self) -> None:
        """The host buffer to the device: the step's one copy (non-blocking from pinned memory on CUDA; the previous
        step's copy has completed, since every step ends with the sampled tokens' transfer to the host)."""
        if self._packed is not self._staging:
            self._packed.copy_(self._staging, non_blocking=True)

    def attention(self, bucket: int) -> PagedDecodeAttention:
        """What the attention of a decode step of `bucket` rows reads: views of the buffers' first rows."""
        return PagedDecodeAttention(self.slot_mapping_long[:bucket], self.block_tables[:bucket],
                                    self.context_lens[:bucket], self.cache.block_size, self.kernel)

    def widen_slot_mapping(self, bucket: int) -> None:
        """slot_mapping as int64, on the device (the first op of a decode forward, inside its graph)."""
        self.slot_mapping_long[:bucket].copy_(self.slot_mapping[:bucket])
