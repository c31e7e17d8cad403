"""Forgetting: the top-K KL on distributions whose KL is known, the suite that ships with loradock, and
`loradock eval --forgetting` against a live loradock server (which needs /v1/completions with "echo": true)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from eval_support import eval_cli
from server_support import MODEL_NAME, ServerThread

from loradock.train.forgetting import general_sentences, suite_prompts, topk_kl

ADAPTER = "qv-r8"  # one of tests/lora_workload.ADAPTERS


def exact_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p.log() - q.log())).sum())


def top(logprobs: torch.Tensor, k: int) -> dict[str, float]:
    values, indices = logprobs.topk(k)
    return {f"t{i}": float(v) for v, i in zip(values.double(), indices.tolist())}


def random_distributions(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, vocab, generator=generator, dtype=torch.float64) * 2
    return torch.log_softmax(logits[0], 0), torch.log_softmax(logits[1], 0)


@pytest.mark.parametrize("seed", range(5))
def test_when_both_top_k_hold_every_token_the_kl_is_exact(seed):
    a, b = random_distributions(12, seed)
    assert topk_kl(top(a, 12), top(b, 12)) == pytest.approx(exact_kl(a.exp(), b.exp()), abs=1e-9)


def test_the_kl_of_a_model_with_itself_is_zero_even_truncated():
    a, _ = random_distributions(50, seed=0)
    assert topk_kl(top(a, 5), top(a, 5)) == pytest.approx(0.0, abs=1e-12)


def test_a_token_missing_from_one_top_k_gets_that_models_smallest_shown_logprob():
    adapter = {"a": math.log(0.7), "b": math.log(0.2)}  # 0.1 elsewhere
    base = {"a": math.log(0.6), "c": math.log(0.1)}  # 0.3 elsewhere
    # adapter over (a, b, c, other): 0.7, 0.2, 0.2 (c: its smallest shown) -> sums to 1.1: scaled, no "other"
    p = [0.7 / 1.1, 0.2 / 1.1, 0.2 / 1.1, 0.0]
    # base: 0.6, 0.1 (b: its smallest shown), 0.1, and "other" 0.2
    q = [0.6, 0.1, 0.1, 0.2]
    expected = sum(x * math.log(x / y) for x, y in zip(p, q) if x > 0)
    assert topk_kl(adapter, base) == pytest.approx(expected, rel=1e-12)


def test_truncated_top_k_stays_close_on_peaked_distributions():
    """With K = 20 of 200 tokens holding nearly all the mass (as real models' next-token distributions do), the
    approximation is within a few percent of the exact KL."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(200, generator=generator, dtype=torch.float64) * 6
    a = torch.log_softmax(logits, 0)
    b = torch.log_softmax(logits + torch.randn(200, generator=generator, dtype=torch.float64) * 0.5, 0)
    exact = exact_kl(a.exp(), b.exp())
    assert topk_kl(top(a, 20), top(b, 20)) == pytest.approx(exact, rel=0.05)


def test_the_suite_ships_forty_prompts_and_a_general_text():
    prompts, sentences = suite_prompts(), general_sentences()
    assert len(prompts) == 40 and len(set(prompts)) == 40
    assert all(p.startswith("Question: ") and p.endswith("\nAnswer:") for p in prompts)
    assert len(sentences) > 15 and all(s[-1] in ".!?" for s in sentences)


@pytest.fixture(scope="module")
def server(model_dir, adapter_dir):
    with ServerThread(model_dir("llama"), adapter_dir) as running:
        yield running


def forgetting(server, tmp_path, model: str) -> dict:
    out = tmp_path / f"{model}.json"
    assert eval_cli("--url", server.url, "--model", model, "--baseline", MODEL_NAME, "--forgetting",
                    "--out", str(out)) == 0
    assert out.with_name(f"{model}.forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(out.read_text())["forgetting"]


def test_an_adapter_moves_away_from_the_base_and_the_base_not_from_itself(server, tmp_path):
    """Needs the server to score a text: /v1/completions with "echo": true and "logprobs"."""
    same = forgetting(server, tmp_path, MODEL_NAME)
    assert same["agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["ppl_ratio"] == pytest.approx(1.0) and same["kl_tokens"] > 0
    moved = forgetting(server, tmp_path, ADAPTER)
    assert moved["agreement"] < 1.0 and moved["kl"] > 0.01
    assert moved["perplexity"]["base"] == pytest.approx(same["perplexity"]["base"])
    assert moved["perplexity"]["model"] != pytest.approx(moved["perplexity"]["base"])
    assert len(moved["per_prompt"]) == 40
