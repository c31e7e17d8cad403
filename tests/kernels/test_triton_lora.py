"""The Triton LoRA kernels (interpreted, fp32; compiled on CUDA) against the oracle."""

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
from loradock.kernels.lora import (
    LoraMeta,
    lora_operands,
    select_lora_backend,
)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_triton_matches_reference(triton, case, layout):
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case, layout=layout, device=triton.device)
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    meta = meta_for(case.token_slots, case.num_slots, triton.device)
    triton.lora.TritonBackend(split_k=1).add_lora(y, x, lora_operands(A, B, scales, ranks), meta)
    torch.testing.assert_close(y_storage.cpu(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", [CASES[0], CASES[6]], ids=lambda case: case.name)
def test_triton_split_k(triton, case):
    # 2000 input features: each of the 3 splits reduces its own 768 (whole 256-wide K blocks, the last one masked)
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(
        case, device=triton.device, in_features=2000
    )
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    meta = meta_for(case.token_slots, case.num_slots, triton.device)
    triton.lora.TritonBackend(split_k=3).add_lora(y, x, lora_operands(A, B, scales, ranks), meta)
    # sums of 2000 fp32 products in another order: |y| reaches a few hundred, rounding a few 1e-4
    torch.testing.assert_close(y_storage.cpu(), expected, rtol=1e-4, atol=2e-3)


def test_triton_half_precision(triton):
    case = CASES[6]
    # bf16 is what CUDA serves in; the interpreter computes bf16 through numpy, which has no such type
    dtypes = {torch.float16: 0.1, torch.bfloat16: 0.5} if triton.device == "cuda" else {torch.float16: 0.1}
    for dtype, atol in dtypes.items():  # bf16 keeps 8 bits of mantissa; |y| reaches about 60 here
        y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case, dtype, device=triton.device)
        expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
        meta = meta_for(case.token_slots, case.num_slots, triton.device)
        triton.lora.TritonBackend().add_lora(y, x, lora_operands(A, B, scales, ranks), meta)
        torch.testing.assert_close(y_storage.cpu().float(), expected, rtol=1e-2, atol=atol)


def test_triton_shrink_writes_only_adapter_rows(triton):
    case = CASES[2]
    _, _, x, A, _, _, ranks, clean_A, _ = make_operands(case, device=triton.device)
    meta = meta_for(case.token_slots, case.num_slots, triton.device)
    buf = triton.lora.lora_shrink(x, A, ranks, meta, split_k=2)  # [T, R], zero-filled for split-K
    slots = torch.tensor(case.token_slots)
    x, clean_A = x.cpu(), clean_A.cpu()
    expected = torch.where(slots[:, None] >= 0, torch.einsum("ti,tri->tr", x, clean_A[slots.clamp(min=0)]), 0)
    torch.testing.assert_close(buf.cpu(), expected, rtol=1e-5, atol=1e-4)


def test_triton_reads_metadata_sized_for_more_tokens_than_the_step(triton):
    # the engine's metadata is sized for max-batch-tokens; a step uses a prefix of it
    case = CASES[5]
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case, device=triton.device)
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    meta = LoraMeta(max_tokens=256, max_slots=case.num_slots, device=triton.device)
    meta.update(list(range(case.num_slots)) * 40)  # an earlier, longer step leaves stale values past T
    meta.update(list(case.token_slots))
    triton.lora.TritonBackend().add_lora(y, x, lora_operands(A, B, scales, ranks), meta)
    torch.testing.assert_close(y_storage.cpu(), expected, rtol=1e-5, atol=1e-4)


def test_triton_is_selected_when_forced(triton, monkeypatch):
    monkeypatch.setenv("LORADOCK_LORA_BACKEND", "triton")
    assert isinstance(select_lora_backend(torch.device(triton.device)), triton.lora.TritonBackend)
