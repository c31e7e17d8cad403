"""The gathered-LoRA op's test cases and their oracle: token-slot patterns, operands with garbage beyond each slot's
rank and in unused slots, the expected output, and a LoraMeta holding one step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from loradock.kernels.lora import LoraMeta, OutputAffine, lora_reference

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


def expected_output(case: Case, y_storage, x, clean_A, clean_B, scales, ranks, affine=None) -> torch.Tensor:
    """The oracle on zero-padded weights, in fp32 on the CPU: what y_storage must become."""
    expected = y_storage.to("cpu", torch.float32, copy=True)
    affine = None if affine is None else OutputAffine(*(t.cpu() for t in affine))
    lora_reference(
        expected[:, 8 : 8 + case.out], x.cpu().float(), clean_A.cpu().float(), clean_B.cpu().float(), scales.cpu(),
        ranks.cpu(), torch.tensor(case.token_slots), affine,
    )
    return expected


def make_affine(case: Case, mapped_slots, seed: int = 1, device: str = "cpu") -> OutputAffine:
    """An output affine that maps `mapped_slots` (DoRA-like scales near 1, random shifts) and holds NaN in every
    other slot's vectors, which no kernel may read."""
    generator = torch.Generator().manual_seed(seed)
    S, out = case.num_slots, case.out
    scale = 1 + 0.3 * torch.randn(S, out, generator=generator)  # [S, out]
    shift = torch.randn(S, out, generator=generator)  # [S, out]
    mapped = torch.zeros(S, dtype=torch.int32)  # [S]
    mapped[list(mapped_slots)] = 1
    scale[mapped == 0], shift[mapped == 0] = math.nan, math.nan
    return OutputAffine(scale.to(device), shift.to(device), mapped.to(device))


def meta_for(token_slots, num_slots: int, device: str = "cpu", max_tokens: int | None = None) -> LoraMeta:
    """A LoraMeta holding one step with these token slots."""
    meta = LoraMeta(max_tokens or max(len(token_slots), 1), num_slots, device)
    meta.update(list(token_slots))
    return meta
