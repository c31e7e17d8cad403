"""Gathered-LoRA ops: metadata, the fast torch path and the Triton kernels (interpreted, fp32) against the oracle."""

from __future__ import annotations

import logging
import math
import multiprocessing
import threading
from dataclasses import dataclass

import pytest
import torch
from triton_support import triton_modules

from loradock.kernels import cpu_build, custom_ops
from loradock.kernels.cpu_build import cpu_ops
from loradock.kernels.cpu_lora import CpuBackend
from loradock.kernels.lora import LoraMeta, lora_operands, lora_reference, select_lora_backend
from loradock.kernels.paged_decode import paged_decode_torch
from loradock.kernels.torch_lora import TorchBackend, run_plan
from loradock.kernels.torch_plan import plan_segments
from loradock.serve.engine.model_runner import cpu_decode_attention

IN_FEATURES = 40  # not a multiple of any block size: exercises the K masks


@dataclass(frozen=True)
class Case:
    """One op configuration: the step's token slots, the slot buffers' shape, the output width."""

    name: str
    token_slots: tuple[int, ...]
    num_slots: int = 6
    max_rank: int = 8
    out: int = 48
    rank: int | None = None  # every slot's real rank; None: random per slot, slot 0 at max_rank
    zero_rank_slots: tuple[int, ...] = ()  # slots whose adapter leaves this module alone (rank 0)
    scale: float | None = None  # every slot's scale; None: random per slot


CASES = [
    # prefill chunks of uneven length, base tokens among them, slot 2 in two chunks (a non-contiguous segment)
    Case("prefill_mixed", (-1,) * 3 + (2,) * 17 + (0,) * 5 + (-1,) + (2,) * 4 + (1,) * 9),
    Case("decode_distinct", tuple(range(12)), num_slots=12),
    Case("decode_distinct_with_base", (3, -1, 0, 5, -1, 1, 4, 2), max_rank=16),
    Case("all_same_slot", (3,) * 24, max_rank=16),
    Case("one_token", (4,)),
    Case("decode_shared_slots", (1, 0, 1, 2, 0, 1, -1, 2, 0, 1) * 3),
    # short runs and base tokens interleaved; a wide output (the expand's column blocks)
    Case("mixed_runs_wide", (-1, 0, 0, 0, 3, 1, 1, 5, 5, 5, 5, -1, 2), out=96, max_rank=12),
    Case("decode_repeated_slots", tuple(range(6)) * 2, out=64, max_rank=16),
    # over 256 tokens: the kernels' 64-row blocks; a 200-token run: the CPU backend's BLAS path
    Case("long_prefill", (-1,) * 20 + (1,) * 200 + (4,) * 3 + (0,) * 130, out=32),
    # one rank for every slot, below max_rank (the torch path's batched bmm reads the slot buffers in place)
    Case("decode_uniform_rank", tuple(range(8)) * 2, num_slots=10, max_rank=16, rank=6, scale=1.75),
    Case("uniform_rank_slot_gaps", (0, 2, 5, 2, 0, 5, -1, 5), rank=5),  # slots 1, 3, 4 unused
    Case("zero_rank_slots", (0, 1, 2, 3, -1) * 3, num_slots=4, rank=8, zero_rank_slots=(1, 3), scale=0.5),
    Case("far_apart_slots", (7, 0, 7, 0, -1, 7), num_slots=8),
    # ranks above the CPU kernel's 64-rank chunk; segments of 1, 5 and 6 tokens (its 4-token tiles and their rests)
    Case("rank_above_chunk", (0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2), num_slots=3, max_rank=80),
]

LAYOUTS = ["contiguous", "rank_outermost", "rank_innermost", "out_innermost"]  # how A and B lie in memory (`make_operands`)


def make_operands(
    case: Case, dtype: torch.dtype = torch.float32, seed: int = 0, layout: str = "contiguous", device: str = "cpu",
    in_features: int = IN_FEATURES,
):
    """Random operands of a case, garbage (NaN, huge values) beyond each slot's rank and in every slot no token
    uses (scales too), y a strided column view. layout: 'contiguous'; 'rank_outermost': A stored [R, S, in]
    and B [R, S, out] (the torch and Triton backends' `slot_buffers`); 'rank_innermost': A stored [S, in, R];
    'out_innermost': B stored [S, R, out] (the CPU backend's).

    Returns (y_storage [T, out+16], y [T, out] view of columns 8.., x, A, B, scales, ranks, clean A, clean B):
    clean A/B are zero beyond rank, for the oracle.
    """
    generator = torch.Generator().manual_seed(seed)
    S, R, T, out = case.num_slots, case.max_rank, len(case.token_slots), case.out
    if case.rank is None:
        ranks = torch.randint(1, R + 1, (S,), generator=generator, dtype=torch.int32)  # [S]
        ranks[0] = R  # one slot at full rank: no padding at all
    else:
        ranks = torch.full((S,), case.rank, dtype=torch.int32)  # [S]
    ranks[list(case.zero_rank_slots)] = 0
    scales = torch.rand(S, generator=generator) + 0.5 if case.scale is None else torch.full((S,), case.scale)
    A = torch.randn(S, R, in_features, generator=generator)  # [S, R, in]
    B = torch.randn(S, out, R, generator=generator)  # [S, out, R]
    within = torch.arange(R)[None, :] < ranks[:, None]  # [S, R]
    clean_A, clean_B = torch.where(within[:, :, None], A, 0), torch.where(within[:, None, :], B, 0)
    A = torch.where(within[:, :, None], A, torch.where(torch.rand(A.shape, generator=generator) < 0.5, math.nan, 1e6))
    B = torch.where(within[:, None, :], B, torch.where(torch.rand(B.shape, generator=generator) < 0.5, math.nan, -1e6))
    unused = [slot for slot in range(S) if slot not in case.token_slots]
    A[unused], B[unused], scales[unused] = math.nan, math.nan, math.nan
    if layout == "rank_outermost":
        A = A.transpose(0, 1).contiguous().transpose(0, 1)  # [S, R, in], stored [R, S, in]
        B = B.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # [S, out, R], stored [R, S, out]
    elif layout == "rank_innermost":
        A = A.transpose(1, 2).contiguous().transpose(1, 2)  # [S, R, in], stored [S, in, R]
    elif layout == "out_innermost":
        B = B.transpose(1, 2).contiguous().transpose(1, 2)  # [S, out, R], strides (R * out, 1, out)
    x = torch.randn(T, in_features, generator=generator)  # [T, in]
    y_storage = torch.randn(T, out + 16, generator=generator)  # [T, out + 16]
    # .to keeps the strides of these dense layouts; y is made a view of y_storage only on `device`
    y_storage, x, A, B, clean_A, clean_B = (t.to(device, dtype) for t in (y_storage, x, A, B, clean_A, clean_B))
    scales, ranks = scales.to(device), ranks.to(device)
    y = y_storage[:, 8 : 8 + out]  # [T, out], row stride out + 16
    return y_storage, y, x, A, B, scales, ranks, clean_A, clean_B


def expected_output(case: Case, y_storage, x, clean_A, clean_B, scales, ranks) -> torch.Tensor:
    """The oracle on zero-padded weights, in fp32 on the CPU: what y_storage must become."""
    expected = y_storage.to("cpu", torch.float32, copy=True)
    lora_reference(
        expected[:, 8 : 8 + case.out], x.cpu().float(), clean_A.cpu().float(), clean_B.cpu().float(), scales.cpu(),
        ranks.cpu(), torch.tensor(case.token_slots),
    )
    return expected


def meta_for(token_slots, num_slots: int, device: str = "cpu", max_tokens: int | None = None) -> LoraMeta:
    """A LoraMeta holding one step with these token slots."""
    meta = LoraMeta(max_tokens or max(len(token_slots), 1), num_slots, device)
    meta.update(list(token_slots))
    return meta


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


# ---------------------------------------------------------------------------------------------- compiled CPU kernel

CPU_KERNEL_LAYOUTS = ["rank_outermost", "out_innermost"]  # the layouts it reads (out_innermost: slot-major)


@pytest.fixture(scope="module")
def cpu_ops_built():
    """The compiled CPU ops: built here if no earlier run on this machine built it (about half a minute)."""
    kernel = cpu_ops()
    assert kernel is not None, "the compiled CPU ops did not build: see the loradock.kernels warning"
    return kernel


@pytest.fixture
def calls(cpu_ops_built, monkeypatch):
    """Counts of the paths the CPU backend takes: the kernel's two entry points and the torch fallback."""
    counted = {"lora_apply": 0, "lora_linear": 0, "torch": 0}

    def counting(name, function):
        def wrapper(*args):
            counted[name] += 1
            return function(*args)

        return wrapper

    for name in ("lora_apply", "lora_linear"):
        monkeypatch.setattr(cpu_ops_built, name, counting(name, getattr(cpu_ops_built, name)))
    monkeypatch.setattr(TorchBackend, "_add", counting("torch", TorchBackend._add))
    return counted


def with_threads(threads: int, function, *args):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return function(*args)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", CPU_KERNEL_LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_cpu_kernel_matches_reference(calls, case, layout, threads):
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case, layout=layout)
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    with_threads(threads, CpuBackend().add_lora, y, x, lora_operands(A, B, scales, ranks),
                 meta_for(case.token_slots, case.num_slots))
    torch.testing.assert_close(y_storage, expected, rtol=1e-5, atol=1e-4)
    assert calls == {"lora_apply": 1, "lora_linear": 0, "torch": 0}


def kernel_call(compiled, y, x, ops, meta, max_length):
    compiled.lora_apply(y, x, ops.A, ops.B, ops.scales, ops.ranks, meta.sorted_tokens, meta.segment_slots,
                        meta.segment_starts, meta.segment_lengths, len(meta.segments), max_length)


def test_cpu_kernel_alone_takes_segments_of_any_length(cpu_ops_built):
    case = CASES[8]  # long_prefill: a run of 200 tokens, which the backend hands to torch's BLAS instead
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case, layout="rank_outermost")
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    kernel_call(cpu_ops_built, y, x, lora_operands(A, B, scales, ranks), meta_for(case.token_slots, case.num_slots),
                max_length=10_000)
    torch.testing.assert_close(y_storage, expected, rtol=1e-5, atol=1e-4)


def test_cpu_kernel_leaves_segments_from_max_length_to_blas(cpu_ops_built):
    case = CASES[8]
    y_storage, y, x, A, B, scales, ranks, _, _ = make_operands(case, layout="rank_outermost")
    before = y_storage.clone()
    kernel_call(cpu_ops_built, y, x, lora_operands(A, B, scales, ranks), meta_for(case.token_slots, case.num_slots),
                max_length=100)
    long_rows = [t for t, slot in enumerate(case.token_slots) if slot == 1]  # the 200-token run
    short_rows = [t for t, slot in enumerate(case.token_slots) if slot in (0, 4)]
    assert torch.equal(y_storage[long_rows], before[long_rows])
    assert not torch.equal(y_storage[short_rows], before[short_rows])


@pytest.mark.parametrize("layout", ["contiguous", "rank_innermost", "bfloat16"])
def test_cpu_path_falls_back_to_torch_where_the_kernel_does_not_apply(calls, layout):
    case = CASES[6]
    dtype = torch.bfloat16 if layout == "bfloat16" else torch.float32
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(
        case, dtype, layout="rank_outermost" if layout == "bfloat16" else layout
    )
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    ops = lora_operands(A, B, scales, ranks)
    assert not ops.cpu_kernel_layout
    CpuBackend().add_lora(y, x, ops, meta_for(case.token_slots, case.num_slots))
    tolerance = {"rtol": 2e-2, "atol": 0.5} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-4}
    torch.testing.assert_close(y_storage.float(), expected, **tolerance)
    assert calls == {"lora_apply": 0, "lora_linear": 0, "torch": 1}


def test_cpu_kernel_reads_unit_stride_columns_only(calls, cpu_ops_built):
    case = CASES[5]
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case, layout="rank_outermost")
    ops, meta = lora_operands(A, B, scales, ranks), meta_for(case.token_slots, case.num_slots)
    strided_x = x.t().contiguous().t()
    with pytest.raises(RuntimeError, match="unit strides"):  # the kernel itself refuses what it cannot read
        kernel_call(cpu_ops_built, y, strided_x, ops, meta, max_length=10_000)
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    CpuBackend().add_lora(y, strided_x, ops, meta)  # the backend sends such x to the torch path instead
    torch.testing.assert_close(y_storage, expected, rtol=1e-5, atol=1e-4)
    assert calls["torch"] == 1


def layer_operands(case: Case, layout: str, bias: bool, seed: int = 0, in_features: int = IN_FEATURES):
    """A LoRA layer's parts for a case: the base nn.Linear, x, the operands, the metadata, and the expected
    output: base(x) plus the oracle's deltas."""
    y_storage, _, x, A, B, scales, ranks, clean_A, clean_B = make_operands(
        case, layout=layout, seed=seed, in_features=in_features
    )
    torch.manual_seed(seed)
    base = torch.nn.Linear(in_features, case.out, bias=bias)
    with torch.no_grad():
        y_storage[:, 8 : 8 + case.out] = base(x)
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)[:, 8 : 8 + case.out]  # [T, out]
    return base, x, lora_operands(A, B, scales, ranks), meta_for(case.token_slots, case.num_slots), expected


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", CPU_KERNEL_LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_cpu_lora_layer_overlapped_matches_reference(calls, case, layout, threads, bias):
    base, x, ops, meta, expected = layer_operands(case, layout, bias)
    y = with_threads(threads, CpuBackend().linear, base, x, ops, meta)  # deltas on the helper during the GEMM
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    base_rows = [t for t, slot in enumerate(case.token_slots) if slot < 0]
    with torch.inference_mode():
        assert torch.equal(y[base_rows], base(x)[base_rows])  # base tokens: the GEMM's rows, untouched
    assert calls == {"lora_apply": 0, "lora_linear": 1, "torch": 0}


def test_cpu_lora_layer_waits_for_the_helper(cpu_ops_built):
    # one torch thread, as the server runs, and LoRA work longer than the GEMM (rank 128 on 512 -> 256): the helper
    # thread is still running tiles when the caller's GEMM ends, and the caller must wait for each of them before
    # adding the deltas
    case = Case("heavy_decode", tuple(range(8)) * 8 + (-1,) * 4, num_slots=8, max_rank=128, rank=128, out=256)
    base, x, ops, meta, expected = layer_operands(case, "out_innermost", bias=False, in_features=512)
    backend = CpuBackend()
    for _ in range(50):
        torch.testing.assert_close(with_threads(1, backend.linear, base, x, ops, meta), expected, rtol=1e-5,
                                   atol=1e-3)


def test_cpu_lora_layer_leaves_base_rows_alone_after_a_wider_call(cpu_ops_built):
    # the deltas live in a scratch buffer kept between calls: a call with base tokens after a call that filled it
    # must add nothing to those tokens' rows
    wide_base, wide_x, wide_ops, wide_meta, _ = layer_operands(CASES[8], "out_innermost", bias=False, seed=1)
    case = CASES[2]  # decode_distinct_with_base
    base, x, ops, meta, expected = layer_operands(case, "out_innermost", bias=True)
    backend = CpuBackend()
    with torch.inference_mode():
        for _ in range(3):
            backend.linear(wide_base, wide_x, wide_ops, wide_meta)
            y = backend.linear(base, x, ops, meta)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
            base_rows = [t for t, slot in enumerate(case.token_slots) if slot < 0]
            assert torch.equal(y[base_rows], base(x)[base_rows])


def test_cpu_lora_layer_from_concurrent_callers(cpu_ops_built):
    # one caller at a time has the helper thread; another one meanwhile computes its deltas itself
    parts = [layer_operands(case, "out_innermost", bias=True, seed=seed) for seed, case in enumerate(CASES[:6])]
    errors: list[BaseException] = []

    def call_repeatedly(index: int) -> None:
        base, x, ops, meta, expected = parts[index]
        backend = CpuBackend()
        try:
            with torch.inference_mode():
                for _ in range(200):
                    torch.testing.assert_close(backend.linear(base, x, ops, meta), expected, rtol=1e-5, atol=1e-4)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=call_repeatedly, args=(index,)) for index in range(len(parts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a LoRA layer call never returned"
    assert not errors, errors[0]


def _layer_in_child(connection, part) -> None:
    base, x, ops, meta, _ = part
    connection.send(with_threads(1, CpuBackend().linear, base, x, ops, meta).tolist())  # plain data: no sharing


def test_cpu_lora_layer_in_a_forked_child(cpu_ops_built):
    # the helper thread does not survive fork(): the child computes the deltas itself
    part = layer_operands(CASES[5], "out_innermost", bias=False)
    with torch.inference_mode():
        CpuBackend().linear(*part[:4])  # the parent's helper thread is running
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_layer_in_child, args=(sender, part))
    child.start()
    assert receiver.poll(60), "the forked child's LoRA layer call never returned"
    torch.testing.assert_close(torch.tensor(receiver.recv()), part[4], rtol=1e-5, atol=1e-4)
    child.join(10)
    assert child.exitcode == 0


def test_a_layer_the_kernel_cannot_take_runs_the_base_then_the_op(calls):
    case = CASES[6]
    base, x, ops, meta, expected = layer_operands(case, "out_innermost", bias=True)

    class HookedLinear(torch.nn.Linear):  # not a plain nn.Linear: the base runs as a module, then the op
        def forward(self, inputs):
            return super().forward(inputs) + 1.0

    hooked = HookedLinear(IN_FEATURES, case.out)
    hooked.load_state_dict(base.state_dict())
    backend = CpuBackend()
    with torch.inference_mode():
        torch.testing.assert_close(backend.linear(hooked, x[None], ops, meta), expected[None] + 1.0, rtol=1e-5,
                                   atol=1e-4)
        torch.testing.assert_close(backend.linear(base, x.t().contiguous().t(), ops, meta), expected)  # strided x
    assert calls == {"lora_apply": 1, "lora_linear": 0, "torch": 1}


def test_cpu_ops_build_failure_leaves_the_torch_paths(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LORADOCK_CACHE_DIR", str(tmp_path))  # a fresh build directory
    monkeypatch.setattr(cpu_build, "_built", {})
    monkeypatch.setenv("CXX", "/bin/false")  # a compiler that always fails
    with caplog.at_level(logging.WARNING, logger="loradock.kernels"):
        assert cpu_ops() is None
    assert "could not be built" in caplog.text
    assert cpu_decode_attention(torch.device("cpu"), torch.float32) is None  # the engine's attention: SDPA
    case = CASES[0]
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case, layout="rank_outermost")
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    CpuBackend().add_lora(y, x, lora_operands(A, B, scales, ranks), meta_for(case.token_slots, case.num_slots))
    torch.testing.assert_close(y_storage, expected, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------- Triton

# Interpreted on the CPU everywhere (fp32); compiled for real where there is a CUDA device.
TRITON_TARGETS = [
    "interpreted",
    pytest.param("compiled", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@dataclass(frozen=True)
class TritonTarget:
    lora: object  # loradock.kernels.triton_lora, its kernels interpreted or compiled
    device: str  # where the operands live


@pytest.fixture(scope="module", params=TRITON_TARGETS)
def triton(request):
    """The Triton kernels (LoRA, paged decode attention) interpreted on the CPU, or compiled on CUDA."""
    pytest.importorskip("triton")
    interpret = request.param == "interpreted"
    yield TritonTarget(triton_modules(interpret)["triton_lora"], "cpu" if interpret else "cuda")
    if interpret and torch.cuda.is_available():
        triton_modules(False)  # the engine's CUDA tests want compiled kernels


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


# ---------------------------------------------------------------------------------------------- paged decode attention


def naive_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window):
    """Each sequence's query against its positions one by one, in fp32: the oracle for both implementations."""
    out = torch.empty(q.shape, dtype=torch.float32)
    group = q.shape[1] // k_cache.shape[1]
    for b, length in enumerate(context_lens.tolist()):
        positions = torch.arange(max(0, length - window) if window > 0 else 0, length)
        slots = block_tables[b].long()[positions // block_size] * block_size + positions % block_size
        keys = k_cache[slots].float().repeat_interleave(group, 1)  # [n, H, D]
        values = v_cache[slots].float().repeat_interleave(group, 1)
        weights = (torch.einsum("hd,nhd->hn", q[b].float(), keys) * scale).softmax(-1)
        out[b] = torch.einsum("hn,nhd->hd", weights, values)
    return out


def paged_case(device: str, dtype: torch.dtype, heads: int = 6, kv_heads: int = 2, head_dim: int = 40,
               block_size: int = 4, seed: int = 0):
    """Five sequences of 1 to 32 tokens over shuffled blocks of a cache that also holds other data."""
    generator = torch.Generator().manual_seed(seed)
    num_blocks, max_blocks = 48, 8
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=generator)
    q = torch.randn(5, heads, head_dim, generator=generator)
    tables = torch.randperm(num_blocks, generator=generator)[: 5 * max_blocks].view(5, max_blocks).int()
    lengths = torch.tensor([1, 5, 17, 32, 9], dtype=torch.int32)
    return [t.to(device, dtype) for t in (q, k_cache, v_cache)] + [tables.to(device), lengths.to(device)]


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("group", [(6, 2), (4, 4), (8, 1)], ids=["gqa", "mha", "mqa"])
def test_paged_decode_torch_matches_the_oracle(window, group):
    q, k, v, tables, lengths = paged_case("cpu", torch.float32, *group)
    out = torch.empty_like(q)
    paged_decode_torch(out, q, k, v, tables, lengths, 4, 0.3, window)
    torch.testing.assert_close(out, naive_decode_attention(q, k, v, tables, lengths, 4, 0.3, window), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("layout", [(6, 2, 40, 4), (8, 1, 64, 16), (4, 4, 16, 32)], ids=["gqa", "mqa", "mha"])
def test_paged_decode_triton_matches_the_oracle(triton, window, layout):
    heads, kv_heads, head_dim, block_size = layout
    q, k, v, tables, lengths = paged_case(triton.device, torch.float32, heads, kv_heads, head_dim,
                                          block_size)
    out = torch.empty_like(q)
    custom_ops.paged_decode(out, q, k, v, tables, lengths, block_size, 0.3, window)  # the op the engine calls
    expected = naive_decode_attention(*(t.cpu() for t in (q, k, v, tables, lengths)), block_size, 0.3, window)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_paged_decode_triton_bf16(triton):
    if triton.device != "cuda":
        pytest.skip("bf16 needs the compiled kernel: the interpreter computes through numpy")
    q, k, v, tables, lengths = paged_case("cuda", torch.bfloat16)
    out = torch.empty_like(q)
    custom_ops.paged_decode(out, q, k, v, tables, lengths, 4, 0.3, 0)
    expected = naive_decode_attention(*(t.cpu() for t in (q, k, v, tables, lengths)), 4, 0.3, 0)
    torch.testing.assert_close(out.cpu().float(), expected, rtol=2e-2, atol=2e-2)
