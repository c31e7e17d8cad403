"""`loradock eval`: a model's task score on held-out rows through an OpenAI-compatible server, beside a baseline.

Rows are the trainer's: {"prompt", "completion"} goes to /v1/completions as the prompt, the completion being the
reference; {"messages": [...]} goes to /v1/chat/completions without its last message, which must be the assistant's
reference answer. A row may carry a "pattern" for the regex metric. Every answer is greedy (temperature 0) and
scored by train/metrics.py; the score's 95 % interval, and the paired comparison with a baseline, by
train/intervals.py; --forgetting adds train/forgetting.py's measures against the baseline.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .data import BadRow, check_row, read_rows
from .forgetting import measure_forgetting
from .intervals import paired_comparison, score_summary
from .metrics import Scored, compile_pattern, reference_problem, score
from .openai_client import Prompt, gather, open_client


@dataclass(frozen=True)
class EvalRow:
    source: str  # file:line
    prompt: Prompt  # the plain prompt, or the messages before the reference answer
    reference: str
    pattern: re.Pattern | None  # the regex metric's: the row's own, else --pattern


@dataclass(frozen=True)
class EvalSettings:
    url: str
    model: str
    baseline: str | None = None
    metric: str = "exact"
    max_tokens: int = 64
    concurrency: int = 8
    api_key: str | None = None
    forgetting: bool = False  # compare model with baseline (the base) on the general suite
    seed: int = 0  # the bootstrap's
    quiet: bool = False  # no progress bar


def load_eval_rows(path: Path, metric: str, pattern: str | None = None) -> list[EvalRow]:
    """Every row of a JSONL file as an EvalRow; DataError listing every bad row (file:line: why)."""
    default = compile_pattern(pattern) if pattern is not None else None
    return read_rows(path, lambda row, source: _eval_row(row, source, metric, default))


def _eval_row(row: object, source: str, metric: str, default: re.Pattern | None) -> EvalRow:
    problem = check_row(row)
    if problem is not None:
        raise BadRow(problem)
    if "messages" in row:
        *context, last = row["messages"]
        if last["role"] != "assistant":
            raise BadRow("the last message must be the assistant's reference answer")
        if not context:
            raise BadRow("there is no message before the reference answer to send")
        prompt, reference = context, last["content"]
    else:
        prompt, reference = row["prompt"], row["completion"]
    pattern = default
    if "pattern" in row:
        if not isinstance(row["pattern"], str):
            raise BadRow('"pattern" must be a string')
        try:
            pattern = compile_pattern(row["pattern"])
        except ValueError as exc:
            raise BadRow(str(exc)) from None
    if metric == "regex" and pattern is None:
        raise BadRow('the regex metric needs --pattern or a "pattern" field in the row')
    problem = reference_problem(metric, reference)
    if problem is not None:
        raise BadRow(problem)
    return EvalRow(source, prompt, reference, pattern)


async def evaluate(rows: list[EvalRow], settings: EvalSettings) -> tuple[dict, list[dict]]:
    """The report ({"models": {name: score summary}, "comparison", "forgetting"}) and one record per row. Without
    rows, only forgetting is measured."""
    from tqdm import tqdm

    names = [settings.model] + ([settings.baseline] if settings.baseline else [])
    bar = tqdm(total=0, unit="req", desc="eval", file=sys.stderr, dynamic_ncols=True, disable=settings.quiet)
    with bar:
        async with open_client(settings.url, settings.api_key, settings.concurrency) as client:
            answers = await gather([client.answer(name, row.prompt, settings.max_tokens) for name in names
                                    for row in rows], bar)
            forgetting = (await measure_forgetting(client, settings.model, settings.baseline, bar)
                          if settings.forgetting else None)
    texts = {name: [a.text for a in answers[i * len(rows) : (i + 1) * len(rows)]] for i, name in enumerate(names)}
    scores = {name: [score(settings.metric, text, row.reference, row.pattern) for text, row in zip(texts[name], rows)]
              for name in names}
    report = {"url": settings.url, "model": settings.model, "baseline": settings.baseline, "metric": settings.metric,
              "max_tokens": settings.max_tokens,
              **(_task_report(scores, settings) if rows else {"models": {}, "comparison": None}),
              "forgetting": forgetting}
    return report, _records(rows, texts, scores)


def _task_report(scores: dict[str, list[Scored]], settings: EvalSettings) -> dict:
    row_level = settings.metric != "json-fields"
    comparison = None
    if settings.baseline:
        comparison = {"model": settings.model, "baseline": settings.baseline,
                      **paired_comparison(scores[settings.model], scores[settings.baseline], settings.seed)}
    return {"models": {name: score_summary(values, row_level, settings.seed) for name, values in scores.items()},
            "comparison": comparison}


def _records(rows: list[EvalRow], texts: dict[str, list[str]], scores: dict[str, list[Scored]]) -> list[dict]:
    return [{"source": row.source, "reference": row.reference,
             "results": {name: {"answer": texts[name][i], "correct": scores[name][i].correct,
                                "total": scores[name][i].total} for name in texts}}
            for i, row in enumerate(rows)]


def summary(report: dict) -> list[str]:
    """The report in a few lines for the terminal."""
    lines = []
    if report["models"]:
        first = next(iter(report["models"].values()))
        lines.append(f"{report['metric']} on {first['rows']} rows (95% interval: {first['interval']})")
        for name, result in report["models"].items():
            low, high = result["ci95"]
            lines.append(f"  {name:>24}  {result['score']:.3f}  [{low:.3f}, {high:.3f}]  "
                         f"({result['correct']}/{result['total']})")
    comparison = report.get("comparison")
    if comparison:
        low, high = comparison["ci95"]
        lines.append(f"  {'difference':>24}  {comparison['difference']:+.3f}  [{low:+.3f}, {high:+.3f}]  "
                     f"rows better {comparison['better']}, worse {comparison['worse']}, same {comparison['same']}; "
                     f"sign test p = {comparison['sign_test_p']:.3g}")
    forgetting = report.get("forgetting")
    if forgetting:
        perplexity = forgetting["perplexity"]
        lines.append(f"forgetting on {forgetting['prompts']} general prompts: agreement {forgetting['agreement']:.3f}, "
                     f"KL {forgetting['kl']:.4f} nats/token; perplexity on the general text "
                     f"{perplexity['base']:.2f} (base) -> {perplexity['model']:.2f} "
                     f"(ratio {forgetting['ppl_ratio']:.3f})")
    return lines
