"""Forgetting: how far an adapter moved the base on general text it was not trained for.

The suite ships with loradock (forgetting_suite/): 40 short general prompts (facts, arithmetic, instructions,
chit-chat) and a few paragraphs of plain English. Through any OpenAI-compatible server, for the adapter and the
base:

- agreement: the share of prompts where the adapter's greedy answer equals the base's, character for character;
- kl: the mean per-token KL(adapter ‖ base) over the base's own greedy answers (each prompt + base answer scored by
  both models; ``topk_kl`` at every answer position), over all answer tokens of all prompts;
- perplexity of each model on the general text, sentence by sentence (short requests fit any context), over all
  its scored tokens; ppl_ratio = adapter / base.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .data import BadRow, read_rows
from .openai_client import Answer, OpenAIClient, ServerError, TokenScores, gather

SUITE = Path(__file__).with_name("forgetting_suite")
TOP_K = 20  # logprobs per position: vLLM's default limit (--max-logprobs 20) and loradock's
MAX_TOKENS = 32
_FLOOR = 1e-12  # probability floor in the KL: rounding can leave the base's "other" at 0 beside the adapter's > 0


def topk_kl(adapter: dict[str, float], base: dict[str, float]) -> float:
    """KL(adapter ‖ base) at one position from each model's top-K {token: logprob} (an approximation).

    Over the union U of both top-K sets: a token missing from one model's top-K gets that model's smallest shown
    logprob (an upper bound of its true one). The probability each model's values over U leave of 1 is one more
    outcome, "other" (if the values exceed 1, there is none and they are scaled to sum to 1). Then
    KL = Σ q_a · log(q_a / q_b) over U ∪ {other}, probabilities floored at 1e-12.

    Exact when both top-K sets hold all of each model's probability. Otherwise it approximates: lumping the tokens
    outside U into "other" can only lower the KL (log-sum inequality), and the upper bounds can move it either way.
    """
    union = sorted(adapter.keys() | base.keys())
    p, q = _on(union, adapter), _on(union, base)
    return sum(a * (math.log(a) - math.log(max(b, _FLOOR))) for a, b in zip(p, q) if a > _FLOOR)


def _on(union: list[str], top: dict[str, float]) -> list[float]:
    """One model's probabilities over the union, then "other", summing to 1."""
    smallest = min(top.values())
    shown = [math.exp(top.get(token, smallest)) for token in union]
    probabilities = [*shown, max(0.0, 1.0 - sum(shown))]
    total = sum(probabilities)
    return [value / total for value in probabilities]


def suite_prompts() -> list[str]:
    return read_rows(SUITE / "prompts.jsonl", _prompt)


def _prompt(row: object, source: str) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise BadRow('a suite row is {"prompt": "..."}')
    return row["prompt"]


def general_sentences() -> list[str]:
    """The general text, one sentence per item."""
    text = (SUITE / "general_text.txt").read_text(encoding="utf-8")
    return [sentence for sentence in re.split(r"(?<=[.!?])\s+", text.strip()) if sentence]


async def measure_forgetting(client: OpenAIClient, model: str, base: str, bar=None) -> dict:
    """Agreement, KL and perplexities of `model` against `base` on the suite (see the module docstring), with
    per-prompt details; `bar` (tqdm) counts the requests."""
    prompts = suite_prompts()
    answers: list[Answer] = await gather([client.answer(m, p, MAX_TOKENS) for m in (base, model) for p in prompts], bar)
    base_answers, model_answers = answers[: len(prompts)], answers[len(prompts) :]
    answered = [i for i, a in enumerate(base_answers) if a.text]
    texts = [prompts[i] + base_answers[i].text for i in answered]
    sentences = general_sentences()
    scores: list[TokenScores] = await gather(
        [client.score(m, text, TOP_K) for m in (base, model) for text in texts + sentences], bar)
    count = len(texts) + len(sentences)
    base_scores, model_scores = scores[:count], scores[count:]
    kls = {i: _answer_kl(m, b, base_answers[i].prompt_tokens)
           for i, m, b in zip(answered, model_scores, base_scores)}
    tokens = sum(len(kl) for kl in kls.values())
    base_ppl, model_ppl = _perplexity(base_scores[len(texts) :]), _perplexity(model_scores[len(texts) :])
    return {
        "prompts": len(prompts),
        "agreement": sum(m.text == b.text for m, b in zip(model_answers, base_answers)) / len(prompts),
        "kl": sum(sum(kl) for kl in kls.values()) / tokens if tokens else 0.0,
        "kl_tokens": tokens,
        "perplexity": {"model": model_ppl, "base": base_ppl},
        "ppl_ratio": model_ppl / base_ppl,
        "top_k": TOP_K,
        "max_tokens": MAX_TOKENS,
        "per_prompt": [
            {"prompt": prompt, "base_answer": b.text, "answer": m.text, "agree": m.text == b.text,
             "kl": sum(kls[i]) / len(kls[i]) if kls.get(i) else None, "kl_tokens": len(kls.get(i, []))}
            for i, (prompt, b, m) in enumerate(zip(prompts, base_answers, model_answers))
        ],
    }


def _answer_kl(model: TokenScores, base: TokenScores, prompt_tokens: int | None) -> list[float]:
    """KL(model ‖ base) at each position of the base's answer: those from the prompt's length on."""
    if model.tokens != base.tokens:
        raise ServerError("the adapter and the base tokenize the same text differently: they do not share a base")
    if prompt_tokens is None:
        raise ServerError("the server's answer has no usage.prompt_tokens: cannot tell the answer's tokens apart")
    return [topk_kl(m, b) for m, b in zip(model.top[prompt_tokens:], base.top[prompt_tokens:])]


def _perplexity(scores: list[TokenScores]) -> float:
    """exp(−mean log p) over every token that has a log-probability (each text's first has none)."""
    logprobs = [lp for s in scores for lp in s.logprobs if lp is not None]
    return math.exp(-sum(logprobs) / len(logprobs))


def plot_forgetting(report: dict, model: str, base: str, path: Path) -> None:
    """Per-prompt mean KL as bars, and the two perplexities on the general text, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4), dpi=100, gridspec_kw={"width_ratios": [4, 1]})
    kls = [p["kl"] or 0.0 for p in report["per_prompt"]]
    colours = ["tab:green" if p["agree"] else "tab:red" for p in report["per_prompt"]]
    left.bar(range(1, len(kls) + 1), kls, color=colours)
    left.axhline(report["kl"], color="black", linestyle="--", linewidth=1, label=f"mean per token {report['kl']:.4f}")
    left.set_xlabel("suite prompt (green: same answer as the base, red: different)")
    left.set_ylabel("mean KL(adapter ‖ base), nats/token")
    left.set_title(f"{model} vs {base}: agreement {report['agreement']:.0%}")
    left.legend()
    perplexity = report["perplexity"]
    right.bar([base, model], [perplexity["base"], perplexity["model"]], color=["tab:gray", "tab:blue"])
    right.set_ylabel("perplexity on the general text")
    right.set_title(f"ratio {report['ppl_ratio']:.3f}")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
