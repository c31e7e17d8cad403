"""The torch LoRA backend and the oracle; backend selection, slot-buffer layouts, operand checks."""

from __future__ import annotations

import pytest
import torch
from lora_cases import (
    CASES,
    LAYOUTS,
    expected_output,
    make_operands,
    meta_for,
)
from loradock.kernels.cpu_lora import CpuBackend
from loradock.kernels.lora import (
    lora_operands,
    lora_reference,
    select_lora_backend,
)
from loradock.kernels.torch_lora import TorchBackend, run_plan
from loradock.kernels.torch_plan import plan_segments

# ---------------------------------------------------------------------------------------------- torch path


def test_reference_ignores_garbage_beyond_rank():
    case = CASES[6]
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case)
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    lora_reference(y, x, A, B, scales, ranks, torch.tensor(case.token_slots))
    torch.testing.assert_close(y_storage, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strategy", ["loop", "batched", None])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_torch_path_matches_reference(case, strategy, layout):
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case, layout=layout)
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    meta, ops = meta_for(case.token_slots, case.num_slots), lora_operands(A, B, scales, ranks)
    if strategy is None:  # the backend's own plan
        TorchBackend().add_lora(y, x, ops, meta)
    else:
        run_plan(y, x, ops, plan_segments(meta.segments, meta.order, x.device, strategy), meta)
    torch.testing.assert_close(y_storage, expected, rtol=1e-5, atol=1e-4)


def test_torch_path_bf16():
    case = CASES[0]
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case, torch.bfloat16)
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    TorchBackend().add_lora(y, x, lora_operands(A, B, scales, ranks), meta_for(case.token_slots, case.num_slots))
    torch.testing.assert_close(y_storage.float(), expected, rtol=2e-2, atol=0.5)


def test_the_torch_plan_is_made_once_per_step(monkeypatch):
    import loradock.kernels.torch_lora as torch_lora

    made = []
    monkeypatch.setattr(torch_lora, "plan_segments", lambda *args: made.append(args) or plan_segments(*args))
    case = CASES[5]
    _, y, x, A, B, scales, ranks, _, _ = make_operands(case)
    backend, meta, ops = TorchBackend(), meta_for(case.token_slots, case.num_slots), lora_operands(A, B, scales, ranks)
    for _ in range(3):  # three layers of one step
        backend.add_lora(y, x, ops, meta)
    meta.update(list(case.token_slots))  # the next step
    backend.add_lora(y, x, ops, meta)
    assert len(made) == 2


def test_select_lora_backend(monkeypatch):
    monkeypatch.delenv("LORADOCK_LORA_BACKEND", raising=False)
    assert select_lora_backend(torch.device("cpu")).name == "cpp"
    assert select_lora_backend(torch.device("meta")).name == "torch"
    monkeypatch.setenv("LORADOCK_LORA_BACKEND", "torch")
    assert select_lora_backend(torch.device("cuda")).name == "torch"
    monkeypatch.setenv("LORADOCK_LORA_BACKEND", "cpp")
    with pytest.raises(ValueError, match="CPU only"):
        select_lora_backend(torch.device("cuda"))
    monkeypatch.setenv("LORADOCK_LORA_BACKEND", "cuda")
    with pytest.raises(ValueError):
        select_lora_backend(torch.device("cpu"))


def test_no_adapter_token_runs_nothing():
    y = torch.ones(3, 4)
    A, B, scales, ranks = torch.ones(2, 1, 2), torch.ones(2, 4, 1), torch.ones(2), torch.ones(2, dtype=torch.int32)
    TorchBackend().add_lora(y, torch.ones(3, 2), lora_operands(A, B, scales, ranks), meta_for([-1, -1, -1], 2))
    assert (y == 1).all()


def test_slot_buffers_layout_follows_the_backend():
    A, B = CpuBackend().slot_buffers(3, 4, 5, 6, torch.float32, torch.device("cpu"))
    assert A.shape == (3, 4, 5) and A.stride() == (20, 5, 1)  # [S, R, in] in memory: slot-major
    assert B.shape == (3, 6, 4) and B.stride() == (24, 1, 6)  # [S, R, out] in memory
    assert not (A.any() or B.any())
    assert lora_operands(A, B, torch.zeros(3), torch.zeros(3, dtype=torch.int32)).cpu_kernel_layout
    A, B = TorchBackend().slot_buffers(3, 4, 5, 6, torch.float32, torch.device("meta"))  # rank-outermost
    assert A.shape == (3, 4, 5) and A.stride() == (5, 15, 1)  # [R, S, in] in memory
    assert B.shape == (3, 6, 4) and B.stride() == (6, 1, 18)  # [R, S, out] in memory


def test_operands_are_checked():
    case = CASES[6]
    _, y, x, A, B, scales, ranks, _, _ = make_operands(case)
    meta = meta_for(case.token_slots, case.num_slots)
    with pytest.raises(ValueError):
        lora_operands(A, B[:, :, :4], scales, ranks)
    with pytest.raises(TypeError):
        lora_operands(A, B, scales, ranks.long())
    ops = lora_operands(A, B, scales, ranks)  # checked once: then each call checks x and y
    backend = TorchBackend()
    with pytest.raises(ValueError):
        backend.add_lora(y[:, :64], x, ops, meta)
    with pytest.raises(ValueError):
        backend.add_lora(y, x[:, :8], ops, meta)
    with pytest.raises(TypeError):
        backend.add_lora(y, x.double(), ops, meta)
