"""The compiled CPU LoRA kernel and the CPU backend (kernel, helper thread, fallbacks) against the oracle."""

from __future__ import annotations

import logging
import multiprocessing
import threading

import pytest
import torch
from lora_cases import (
    CASES,
    IN_FEATURES,
    Case,
    expected_output,
    make_operands,
    meta_for,
)
from loradock.kernels import cpu_build
from loradock.kernels.cpu_build import cpu_ops
from loradock.kernels.cpu_lora import CpuBackend
from loradock.kernels.packed_linear import PackedLinear, packing_available
from loradock.kernels.lora import (
    lora_operands,
)
from loradock.kernels.torch_lora import TorchBackend
from loradock.serve.engine.model_runner import cpu_cached_attention

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


@pytest.mark.parametrize("layout", ["contiguous", "rank_innermost", "float16"])
def test_cpu_path_falls_back_to_torch_where_the_kernel_does_not_apply(calls, layout):
    case = CASES[6]
    dtype = torch.float16 if layout == "float16" else torch.float32
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(
        case, dtype, layout="rank_outermost" if layout == "float16" else layout
    )
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    ops = lora_operands(A, B, scales, ranks)
    assert not ops.cpu_kernel_layout
    CpuBackend().add_lora(y, x, ops, meta_for(case.token_slots, case.num_slots))
    tolerance = {"rtol": 2e-2, "atol": 0.5} if dtype == torch.float16 else {"rtol": 1e-5, "atol": 1e-4}
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


def layer_operands(case: Case, layout: str, bias: bool, seed: int = 0, in_features: int = IN_FEATURES,
                   dtype: torch.dtype = torch.float32):
    """A LoRA layer's parts for a case: the base nn.Linear, x, the operands, the metadata, and the expected
    output: base(x) plus the oracle's deltas (in float32)."""
    y_storage, _, x, A, B, scales, ranks, clean_A, clean_B = make_operands(
        case, dtype, layout=layout, seed=seed, in_features=in_features
    )
    torch.manual_seed(seed)
    base = torch.nn.Linear(in_features, case.out, bias=bias, dtype=dtype)
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
    # base tokens: the GEMM's rows, untouched; the reference on as many threads (a float32 GEMM's sums may be
    # ordered by its thread count: seen on an AMD EPYC)
    assert torch.equal(y[base_rows], with_threads(threads, base, x)[base_rows])
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
    assert cpu_cached_attention(torch.device("cpu"), torch.float32) is None  # the engine's attention: SDPA
    case = CASES[0]
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case, layout="rank_outermost")
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    CpuBackend().add_lora(y, x, lora_operands(A, B, scales, ranks), meta_for(case.token_slots, case.num_slots))
    torch.testing.assert_close(y_storage, expected, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------- bfloat16

# The kernel sums in float32 and rounds each y element once, so it lands within one bfloat16 rounding (2^-8 of the
# value) of the float32 oracle on the same bfloat16 operands; atol covers float32 summation-order noise.
BF16_KERNEL_TOLERANCE = {"rtol": 2**-7, "atol": 1e-3}
SHORT_CASES = [case for case in CASES if case.name != "long_prefill"]  # long_prefill: its 200-token run goes to BLAS
# odd widths and ranks: a shrink row of 77 is two full 32-wide bfloat16 dot products and a masked tail of 13
ODD_WIDTHS = (Case("odd_widths", (0, 1, 1, 2, 2, 2, -1, 1), num_slots=3, max_rank=9, rank=7, out=45), 77)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case,in_features", [(case, IN_FEATURES) for case in SHORT_CASES] + [ODD_WIDTHS],
                         ids=lambda value: getattr(value, "name", str(value)))
def test_cpu_kernel_in_bfloat16_matches_reference(calls, case, in_features, threads):
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(
        case, torch.bfloat16, layout="out_innermost", in_features=in_features
    )
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    ops = lora_operands(A, B, scales, ranks)
    assert ops.cpu_kernel_layout
    with_threads(threads, CpuBackend().add_lora, y, x, ops, meta_for(case.token_slots, case.num_slots))
    assert y_storage.dtype == torch.bfloat16
    torch.testing.assert_close(y_storage.float(), expected, **BF16_KERNEL_TOLERANCE)
    assert calls == {"lora_apply": 1, "lora_linear": 0, "torch": 0}


def test_cpu_kernel_in_bfloat16_takes_long_segments(cpu_ops_built):
    case = CASES[8]  # long_prefill: runs of 200, 130, 3 tokens
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case, torch.bfloat16, layout="out_innermost")
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    kernel_call(cpu_ops_built, y, x, lora_operands(A, B, scales, ranks), meta_for(case.token_slots, case.num_slots),
                max_length=10_000)
    torch.testing.assert_close(y_storage.float(), expected, **BF16_KERNEL_TOLERANCE)


def test_cpu_backend_in_bfloat16_sends_long_segments_to_blas(calls):
    # torch's BLAS rounds x @ A^T to bfloat16 before the expand, as PEFT in bfloat16 does: an error of a few bfloat16
    # roundings of the shrunk values, times |B| summed over the rank (here deltas reach ~40)
    case = CASES[8]
    y_storage, y, x, A, B, scales, ranks, clean_A, clean_B = make_operands(case, torch.bfloat16, layout="out_innermost")
    expected = expected_output(case, y_storage, x, clean_A, clean_B, scales, ranks)
    CpuBackend().add_lora(y, x, lora_operands(A, B, scales, ranks), meta_for(case.token_slots, case.num_slots))
    torch.testing.assert_close(y_storage.float(), expected, rtol=2**-6, atol=1.0)
    short_rows = [t for t, slot in enumerate(case.token_slots) if slot in (0, 4)]  # runs of 3 and 130: the kernel's
    torch.testing.assert_close(y_storage[short_rows].float(), expected[short_rows], **BF16_KERNEL_TOLERANCE)
    assert calls == {"lora_apply": 1, "lora_linear": 0, "torch": 0}


NEEDS_PACKING = pytest.mark.skipif(not packing_available(), reason="oneDNN cannot pack bf16 weights on this CPU")


@pytest.mark.parametrize("packed", [0] + [pytest.param(chunks, marks=NEEDS_PACKING) for chunks in (1, 2, 3)],
                         ids=["plain", "packed", "packed-2-chunks", "packed-3-chunks"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", SHORT_CASES, ids=lambda case: case.name)
def test_cpu_lora_layer_in_bfloat16_overlapped_matches_reference(calls, case, threads, bias, packed):
    base, x, ops, meta, expected = layer_operands(case, "out_innermost", bias, dtype=torch.bfloat16)
    # the base GEMM through oneDNN's layout, whole or in chunks of its rows shared with the helper
    layer_base = PackedLinear(base, batch_rows=16, chunks=packed) if packed else base
    y = with_threads(threads, CpuBackend().linear, layer_base, x, ops, meta)  # deltas in float32 on the helper
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, **BF16_KERNEL_TOLERANCE)
    base_rows = [t for t, slot in enumerate(case.token_slots) if slot < 0]
    assert torch.equal(y[base_rows], with_threads(threads, base, x)[base_rows])
    assert calls == {"lora_apply": 0, "lora_linear": 1, "torch": 0}


def test_cpu_kernel_refuses_mixed_dtypes(cpu_ops_built):
    case = CASES[5]
    y_storage, y, x, A, B, scales, ranks, _, _ = make_operands(case, torch.bfloat16, layout="out_innermost")
    ops, meta = lora_operands(A, B, scales, ranks), meta_for(case.token_slots, case.num_slots)
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16"):
        kernel_call(cpu_ops_built, y, x.float(), ops, meta, max_length=10_000)
    with pytest.raises(RuntimeError, match="y of x's dtype"):
        kernel_call(cpu_ops_built, y.float(), x, ops, meta, max_length=10_000)


@pytest.mark.parametrize("packed", [pytest.param(True, marks=NEEDS_PACKING), False], ids=["packed", "plain"])
@pytest.mark.parametrize("threads", [1, 2])  # one: the helper thread has the other core
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_a_group_of_lora_layers_in_one_call_gives_each_layers_own_forward(calls, case, threads, packed):
    """q, k and v of a layer in one `lora_linear` call (every GEMM chunk and LoRA tile one job): bit for bit what
    each layer gives alone, in bfloat16, the bases packed whole, in chunks, and plain (or all plain)."""
    layers = [layer_operands(case, "out_innermost", bias, seed=seed, dtype=torch.bfloat16)
              for seed, bias in ((0, True), (1, False), (2, True))]
    x, meta = layers[0][1], layers[0][3]  # one x for the group, as a decoder layer's projections read
    bases = [layer[0] for layer in layers]
    if packed:
        bases[:2] = [PackedLinear(bases[0], batch_rows=16, chunks=2), PackedLinear(bases[1], batch_rows=16)]
    operands = [ops for _, _, ops, _, _ in layers]
    backend = CpuBackend()
    grouped = with_threads(threads, backend.linear_group, bases, x, operands, meta)
    assert calls["lora_linear"] == 1
    for base, ops, y in zip(bases, operands, grouped):
        assert torch.equal(y, with_threads(threads, backend.linear, base, x, ops, meta))
    assert calls == {"lora_apply": 0, "lora_linear": 4, "torch": 0}
