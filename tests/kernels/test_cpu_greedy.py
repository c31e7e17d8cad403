"""The greedy tokens of the compiled CPU ops (`kernels/cpu_greedy.cpp`, through `sampling.greedy_tokens`) against
torch.argmax: the same index on every row, ties, NaN and infinities included."""

from __future__ import annotations

import pytest
import torch

from loradock.kernels.cpu_build import cpu_ops
from loradock.serve.engine.sampling import greedy_tokens


@pytest.fixture(scope="module")
def ops():
    compiled = cpu_ops()
    assert compiled is not None, "the compiled CPU ops did not build: see the loradock.kernels warning"
    return compiled


def awkward_rows(vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """[9, vocab] logits: random rows, and rows whose argmax only a careful scan gets right."""
    torch.manual_seed(vocab)
    logits = torch.randn(9, vocab).to(dtype)
    logits[1, vocab // 3] = logits[1, vocab - 1] = 50.0  # a tie: the first wins
    logits[2, vocab - 1] = 1e30  # the last column, past any whole block of 64
    logits[3, vocab // 2] = float("nan")  # NaN beats any number, the first NaN wins
    logits[3, 1] = float("nan")
    logits[3, 0] = float("inf")
    logits[4] = float("-inf")  # nothing larger than -inf: the first column
    logits[5] = 0.0
    logits[6, 0] = float("inf")
    logits[7, vocab - 1] = float("nan")
    logits[8] = -1e30
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [2, 63, 64, 1000, 49152])
def test_greedy_tokens_are_torch_argmax(ops, dtype, vocab):
    logits = awkward_rows(vocab, dtype)
    found = ops.greedy_tokens(logits)
    assert found.dtype == torch.int64
    assert torch.equal(found, logits.argmax(dim=-1))


def test_rows_of_a_wider_tensor_and_no_rows(ops):
    wide = awkward_rows(1000, torch.bfloat16)
    part = wide[2:8, 5:900]  # rows 1000 apart, 895 columns each
    assert torch.equal(ops.greedy_tokens(part), part.argmax(dim=-1))
    assert ops.greedy_tokens(wide[:0]).shape == (0,)
    assert ops.greedy_tokens(wide[:, :1]).tolist() == [0] * 9  # a vocabulary of one


def test_the_sampler_takes_any_layout_and_rejects_nothing_torch_takes(ops):
    logits = awkward_rows(300, torch.float32)
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))
    columns = logits.t().contiguous().t()  # unit stride along the rows, not the vocabulary: torch's argmax serves
    assert torch.equal(greedy_tokens(columns), logits.argmax(dim=-1))
    halves = logits.half()  # a dtype the compiled ops do not take
    assert torch.equal(greedy_tokens(halves), halves.float().argmax(dim=-1))


def test_wrong_operands_are_refused(ops):
    with pytest.raises(RuntimeError, match="greedy_tokens"):
        ops.greedy_tokens(torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="greedy_tokens"):
        ops.greedy_tokens(torch.zeros(4, 8).t())
    with pytest.raises(RuntimeError, match="greedy_tokens"):
        ops.greedy_tokens(torch.zeros(4, 0))
