"""The gate before registration: conditions on a new adapter's evaluation, checked by `loradock train --gate`.

The language: comma-separated conditions ``name op number``, e.g. ``score>=0.9,kl<=0.2``, all of which must hold.

- score: the task score on --eval-data (--metric); score_lo: the low end of its 95 % interval;
- agreement, kl, ppl_ratio: train/forgetting.py's measures against the base.

The adapter is evaluated by `loradock serve`'s app and engine in this process (train/demo_server.py), on the same
base model, with the base beside it as the baseline.
"""

from __future__ import annotations

import asyncio
import gc
import operator
import re
from dataclasses import dataclass
from pathlib import Path

GATE_CONTEXT = 2048  # tokens of context in the gate's server: an eval row's prompt plus its answer
TASK_MEASURES = ("score", "score_lo")
FORGETTING_MEASURES = ("agreement", "kl", "ppl_ratio")
OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_CONDITION = re.compile(r"\s*([a-z_]+)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


@dataclass(frozen=True)
class Condition:
    name: str
    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        return OPERATORS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.threshold:g}"


def parse_gate(text: str) -> list[Condition]:
    """The conditions of a --gate string; ValueError naming the first part that is not ``name op number``."""
    conditions = []
    for part in text.split(","):
        match = _CONDITION.fullmatch(part)
        if match is None:
            raise ValueError(f"--gate: {part.strip()!r} is not 'name op number' (e.g. score>=0.9): names "
                             f"{', '.join(TASK_MEASURES + FORGETTING_MEASURES)}; ops {', '.join(OPERATORS)}")
        name, op, number = match.groups()
        if name not in TASK_MEASURES + FORGETTING_MEASURES:
            raise ValueError(f"--gate: unknown measure {name!r} in {part.strip()!r}: one of "
                             f"{', '.join(TASK_MEASURES + FORGETTING_MEASURES)}")
        conditions.append(Condition(name, op, float(number)))
    return conditions


def check_gate(conditions: list[Condition], measures: dict[str, float]) -> dict:
    """Each condition with the measured value and whether it holds; "passed" when all do."""
    checks = [{"condition": str(c), "measure": c.name, "value": measures[c.name], "passed": c.holds(measures[c.name])}
              for c in conditions]
    return {"passed": all(check["passed"] for check in checks), "checks": checks}


def failures(result: dict) -> list[str]:
    """The conditions that failed, with their measured values, one line each."""
    return [f"{check['condition']} failed: {check['measure']} = {check['value']:.4g}"
            for check in result["checks"] if not check["passed"]]


async def evaluate_adapter(model: Path, adapter: Path, rows: list, metric: str, forgetting: bool, max_tokens: int,
                           quiet: bool) -> dict:
    """The evaluation report of the adapter folder `adapter` (served under its folder's name) against the bare
    base, through an in-process server on `model` that serves the adapter folder's parent directory."""
    from .demo_server import BASE_NAME, running_server
    from .evaluate import EvalSettings, evaluate

    async with running_server(model, adapter.parent, max_model_len=GATE_CONTEXT) as url:
        settings = EvalSettings(url=url, model=adapter.name, baseline=BASE_NAME, metric=metric, max_tokens=max_tokens,
                                forgetting=forgetting, quiet=quiet)
        report, _records = await evaluate(rows, settings)
    return report


def run_gate(config, adapter: Path, model: Path, rows: list) -> dict:
    """Evaluate a trained adapter as a TrainConfig asks (--eval-data; forgetting when the gate names one of its
    measures) and check --gate: {"evaluation": the report, "gate": check_gate's result, or None without a gate}."""
    import torch

    conditions = parse_gate(config.gate) if config.gate else []
    forgetting = any(c.name in FORGETTING_MEASURES for c in conditions)
    gc.collect()  # the trained model is gone: give its memory back before the server sizes its KV cache
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    report = asyncio.run(evaluate_adapter(model, adapter, rows, config.metric, forgetting, config.eval_max_tokens,
                                          config.quiet))
    gate = check_gate(conditions, measured(report, adapter.name)) if conditions else None
    return {"evaluation": report, "gate": gate}


def measured(report: dict, model: str) -> dict[str, float]:
    """What a --gate condition can name, as far as the evaluation report measured it."""
    values = {}
    if model in report["models"]:
        values.update(score=report["models"][model]["score"], score_lo=report["models"][model]["ci95"][0])
    if report["forgetting"]:
        values.update({name: report["forgetting"][name] for name in FORGETTING_MEASURES})
    return values
