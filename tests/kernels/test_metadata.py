"""Per-step LoRA metadata: grouping by slot, buffers rewritten in place, the torch path's plans."""

from __future__ import annotations

import pytest
import torch
from lora_cases import (
    meta_for,
)
from loradock.kernels.lora import (
    LoraMeta,
)
from loradock.kernels.torch_plan import plan_segments

# ---------------------------------------------------------------------------------------------- metadata


def test_meta_groups_tokens_by_slot():
    meta = meta_for([2, -1, 0, 2, 2, 1, -1, 0], num_slots=5)
    assert meta.sorted_tokens.tolist() == [2, 7, 5, 0, 3, 4, 1, 6]  # slot 0, slot 1, slot 2, then base tokens
    assert meta.segment_slots.tolist() == [0, 1, 2, -1, -1]
    assert meta.segment_starts.tolist() == [0, 2, 3, 0, 0]
    assert meta.segment_lengths.tolist() == [2, 1, 3, 0, 0]
    assert meta.token_slots.dtype == torch.int32 and meta.num_tokens == 8 and meta.num_lora_tokens == 6
    # slot 1's only token is row 5; rows 3, 4 of slot 2 follow row 0, so slot 2 is not contiguous
    assert [(s.slot, s.first_row) for s in meta.segments] == [(0, -1), (1, 5), (2, -1)]
    assert meta.active and meta.order == [2, 7, 5, 0, 3, 4, 1, 6]


def test_meta_rewrites_the_same_tensors_each_step():
    meta = LoraMeta(max_tokens=16, max_slots=4, device="cpu")
    tensors = [meta.token_slots, meta.sorted_tokens, meta.segment_slots, meta.segment_starts, meta.segment_lengths]
    pointers = [t.data_ptr() for t in tensors]
    meta.update([3, 0, 3, 1, 2, 2])
    meta.update([1, -1, 1])  # fewer tokens and segments: the rest of the segment arrays is padding again
    assert [t.data_ptr() for t in tensors] == pointers and meta.step == 2
    assert meta.sorted_tokens[:3].tolist() == [0, 2, 1] and meta.token_slots[:3].tolist() == [1, -1, 1]
    assert meta.segment_slots.tolist() == [1, -1, -1, -1] and meta.segment_lengths.tolist() == [2, 0, 0, 0]


def test_plan_pads_segments_over_views_of_the_slot_range():
    meta = meta_for([2, -1, 0, 2, 2, 1, -1, 0], num_slots=5)
    plan = plan_segments(meta.segments, meta.order, torch.device("cpu"), "batched")
    assert plan.loop == () and plan.batched.slots == slice(0, 3) and plan.batched.used_slots == (0, 1, 2)
    assert plan.batched.rows.tolist() == [[2, 7, 0], [5, 0, 0], [0, 3, 4]]  # padding points at row 0
    assert plan.batched.picks.tolist() == [0, 1, 3, 6, 7, 8] and plan.batched.tokens.tolist() == [2, 7, 5, 0, 3, 4]


def auto_plan(token_slots, num_slots: int):
    meta = meta_for(token_slots, num_slots)
    return plan_segments(meta.segments, meta.order, torch.device("cpu"))


def test_plan_gathers_far_apart_slots_and_includes_gaps_of_close_ones():
    meta = meta_for([7, 0, 7, 0], num_slots=8)
    sparse = plan_segments(meta.segments, meta.order, torch.device("cpu"), "batched")
    assert sparse.batched.slots.tolist() == [0, 7] and sparse.batched.rows.tolist() == [[1, 3], [0, 2]]
    assert sparse.batched.picks is None
    gaps = auto_plan([4, 2, 0, 1] * 4, num_slots=8)  # slot 3 unused
    assert gaps.batched.slots == slice(0, 5) and gaps.batched.rows[3].tolist() == [0, 0, 0, 0]


def test_plan_loops_over_long_segments_and_batches_short_ones():
    decode = auto_plan(list(range(32)), num_slots=32)
    assert decode.loop == () and decode.batched.rows.shape == (32, 1) and decode.batched.picks is None
    one_adapter = auto_plan([0] * 32, num_slots=4)
    assert one_adapter.batched is None and len(one_adapter.loop) == 1
    # 31 decode tokens on their own adapters, then a 300-token prefill chunk on slot 5
    mixed = auto_plan(list(range(31)) + [5] * 300, num_slots=32)
    assert [s.slot for s in mixed.loop] == [5] and mixed.batched.rows.shape == (31, 1)


def test_meta_contiguous_prefill_runs():
    meta = meta_for([-1, 3, 3, 3, 1, 1], num_slots=4)
    assert [tuple(s) for s in meta.segments] == [(1, 0, 2, 4), (3, 2, 3, 1)]


def test_meta_is_inactive_without_adapter_tokens():
    assert not meta_for([-1] * 5, num_slots=4).active
    assert not meta_for([], num_slots=4).active


@pytest.mark.parametrize("slots", [[0, 4], [-2, 0], [0.0], [0] * 9])
def test_meta_rejects_bad_slots(slots):
    with pytest.raises(ValueError):
        LoraMeta(max_tokens=8, max_slots=4, device="cpu").update(slots)
