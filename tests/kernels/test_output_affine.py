"""The output affine of DoRA and lora_bias slots (y = out_scale ⊙ (y + Δ) + out_shift) in every LoRA backend, against
the oracle, with plain and mapped slots in one step."""

from __future__ import annotations

import pytest
import torch
from lora_cases import CASES, expected_output, make_affine, make_operands, meta_for

from loradock.kernels import torch_lora
from loradock.kernels.cpu_build import cpu_ops
from loradock.kernels.cpu_lora import CpuBackend
from loradock.kernels.lora import OutputAffine, lora_operands, lora_reference
from loradock.kernels.torch_lora import TorchBackend

# every case but the ones with a single slot; their slots' ranks are random (odd ones among them) unless fixed
AFFINE_CASES = [case for case in CASES if len({slot for slot in case.token_slots if slot >= 0}) > 1]
FP32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}
# bfloat16: the kernel rounds each y element once; the torch path (the CPU backend's long segments) rounds x @ A^T to
# bfloat16 before the expand and y once more before the affine: a few bfloat16 roundings of values up to ~100
BF16_TOLERANCE = {"rtol": 2**-6, "atol": 1.0}


def mapped_slots(case) -> list[int]:
    """Every other slot the step uses, those of rank 0 left out (a layer maps only slots it holds a module for)."""
    used = sorted({slot for slot in case.token_slots if slot >= 0} - set(case.zero_rank_slots))
    return used[::2]


def affine_operands(case, dtype=torch.float32, layout="out_innermost", device="cpu"):
    """(y_storage, y, x, operands with an affine mapping every other used slot, oracle): oracle(y_storage) is what
    y_storage must become, in float32."""
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case, dtype, layout=layout, device=device)
    affine = make_affine(case, mapped_slots(case), device=device)

    def oracle(before: torch.Tensor) -> torch.Tensor:
        return expected_output(case, before, x, clean_A, clean_B, scales, ranks, affine)

    return y_storage, y, x, lora_operands(A, B, scales, ranks, affine), oracle


def test_reference_maps_a_mapped_slots_rows_after_their_delta():
    case = CASES[2]  # decode_distinct_with_base
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case)
    affine = make_affine(case, mapped_slots(case))
    expected = y.clone()
    for t, slot in enumerate(case.token_slots):  # one token at a time, as written in the op's definition
        if slot < 0:
            continue
        expected[t] += scales[slot] * (clean_B[slot] @ (clean_A[slot] @ x[t]))
        if affine.mapped[slot]:
            expected[t] = affine.scale[slot] * expected[t] + affine.shift[slot]
    lora_reference(y, x, A, B, scales, ranks, torch.tensor(case.token_slots), affine)
    torch.testing.assert_close(y, expected, **FP32_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strategy", [None, "loop", "batched"])
@pytest.mark.parametrize("case", AFFINE_CASES, ids=lambda case: case.name)
def test_torch_path_applies_the_affine(case, strategy, dtype, monkeypatch):
    if strategy is not None:  # force one of the plan's two paths for every segment
        planner = torch_lora.plan_segments
        monkeypatch.setattr(torch_lora, "plan_segments", lambda *args: planner(*args, strategy))
    y_storage, y, x, ops, oracle = affine_operands(case, dtype, layout="rank_outermost")
    expected = oracle(y_storage)
    TorchBackend().add_lora(y, x, ops, meta_for(case.token_slots, case.num_slots))
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
    torch.testing.assert_close(y_storage.float(), expected, **tolerance)


@pytest.fixture(scope="module")
def kernel():
    compiled = cpu_ops()
    assert compiled is not None, "the compiled CPU ops did not build: see the loradock.kernels warning"
    return compiled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", AFFINE_CASES, ids=lambda case: case.name)
def test_cpu_kernel_applies_the_affine(kernel, case, dtype):
    y_storage, y, x, ops, oracle = affine_operands(case, dtype)
    expected = oracle(y_storage)
    assert ops.cpu_kernel_layout
    with torch.inference_mode():
        CpuBackend().add_lora(y, x, ops, meta_for(case.token_slots, case.num_slots))  # long segments: BLAS
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
    torch.testing.assert_close(y_storage.float(), expected, **tolerance)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", AFFINE_CASES, ids=lambda case: case.name)
def test_cpu_lora_layer_applies_the_affine(kernel, case, dtype, threads):
    # the deltas go to float32 scratch on the helper thread during the GEMM, then into the GEMM's rows, mapped
    y_storage, y, x, ops, oracle = affine_operands(case, dtype)
    torch.manual_seed(0)
    base = torch.nn.Linear(x.shape[1], case.out, dtype=dtype)
    with torch.inference_mode():
        y[:] = base(x)
    expected = oracle(y_storage)[:, 8 : 8 + case.out]  # [T, out]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out = CpuBackend().linear(base, x, ops, meta_for(case.token_slots, case.num_slots))
    finally:
        torch.set_num_threads(previous)
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else BF16_TOLERANCE
    torch.testing.assert_close(out.float(), expected, **tolerance)


@pytest.mark.parametrize("backend", [TorchBackend, CpuBackend])
def test_plain_slots_are_computed_exactly_as_without_an_affine(kernel, backend):
    case = CASES[5]  # decode_shared_slots
    y_storage, y, x, A, B, scales, ranks, _, _ = make_operands(case, layout="out_innermost")
    unmapped = make_affine(case, [])  # NaN in every slot's vectors: none may be read
    meta = meta_for(case.token_slots, case.num_slots)
    plain = y_storage.clone()
    with torch.inference_mode():
        backend().add_lora(plain[:, 8 : 8 + case.out], x, lora_operands(A, B, scales, ranks), meta)
        backend().add_lora(y, x, lora_operands(A, B, scales, ranks, unmapped), meta)
    assert torch.equal(y_storage, plain)


def test_triton_applies_the_affine(triton):
    for case in (CASES[0], CASES[2], CASES[6]):  # prefill chunks, decode with base tokens, a wide output
        y_storage, y, x, ops, oracle = affine_operands(case, layout="rank_outermost", device=triton.device)
        expected = oracle(y_storage)
        meta = meta_for(case.token_slots, case.num_slots, triton.device)
        triton.lora.TritonBackend(split_k=1).add_lora(y, x, ops, meta)
        torch.testing.assert_close(y_storage.cpu(), expected, **FP32_TOLERANCE)


def test_an_affine_of_the_wrong_shape_is_refused():
    case = CASES[2]
    _, _, _, A, B, scales, ranks, _, _ = make_operands(case)
    affine = make_affine(case, [0])
    with pytest.raises(ValueError, match="output affine"):
        lora_operands(A, B, scales, ranks, OutputAffine(affine.scale[:, :-1], affine.shift, affine.mapped))
