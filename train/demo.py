"""`loradock demo`: the whole system in one command, offline, on the default model SmolLM2-135M-Instruct.

It builds the model if needed, trains one LoRA adapter per task of train/tasks.py with the bundled trainer, starts
the server with all of them, sends one mixed batch (every held-out prompt to the base and to every adapter, and a
few general questions to each) and prints a few answers, then the table: each model's score on each task, and
how often each adapter still answers the general questions as the base does. It exits 1 if an adapter scores under
90% on its own task. With --work-dir, the data, adapters (with their training reports) and every answer
(answers.jsonl) are kept there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..serve.models.default_model import DEFAULT_MODEL_NAME
from ..serve.engine.threads import use_serving_threads
from ..serve.models.source import resolve_model_path
from .config import TrainConfig
from .demo_server import BASE_NAME, running_server
from .forgetting import suite_prompts
from .metrics import Scored
from .openai_client import gather, open_client
from .progress import quiet_libraries
from .tasks import TASKS, Split, Task, make_split, write_rows
from .trainer import train

REQUIRED_SCORE = 0.9
SEED = 0
# One adapter's training: one pass over STEPS batches of BATCH rows, LoRA r=8 on every linear layer, no evaluation
# or checkpoint during the run (the validation loss is measured before and after it).
STEPS, BATCH = 16, 8
TRAINING = {"rank": 8, "alpha": 16, "dropout": 0.0, "lr": 3e-3, "scheduler": "linear", "warmup": 0,
            "batch_size": BATCH, "max_steps": STEPS, "eval_steps": STEPS + 1, "max_seq_len": 128, "seed": SEED}
VALIDATION_EXAMPLES, TEST_EXAMPLES = 8, 25
GENERAL_EVERY = 2  # every other prompt of the forgetting suite (facts, sums, instructions, chat): 20 of its 40
GENERAL_MAX_TOKENS = 16
SHOWN_ANSWER = 60  # characters of an answer printed from the mixed batch


@dataclass(frozen=True)
class Scores:
    tasks: dict[str, dict[str, float]]  # model -> task -> the task's metric on its held-out prompts
    general: dict[str, float]  # adapter -> share of the general questions it answers exactly as the base does
    general_questions: int


def run(work_dir: Path | None = None) -> int:
    """Run the demo in `work_dir` (kept), or in a temporary folder (removed). Returns the exit status."""
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loradock-demo-")))
        stack.enter_context(quiet_libraries())
        return _run(Path(work_dir), time.perf_counter())


def _run(work_dir: Path, started: float) -> int:
    adapters = work_dir / "adapters"
    if adapters.exists():
        raise ValueError(f"{work_dir} holds a previous demo's adapters: give an empty or new --work-dir")
    _phase(started, f"base model {DEFAULT_MODEL_NAME}: from loradock's cache, built there on first use")
    model = resolve_model_path(None)
    splits = {task.name: make_split(task, SEED, STEPS * BATCH, VALIDATION_EXAMPLES, TEST_EXAMPLES) for task in TASKS}
    for task in TASKS:
        _phase(started, f"training adapter {task.name!r}: {task.description}")
        _train(task, splits[task.name], model, work_dir)
    use_serving_threads()  # training took every core; serving leaves one to the event loop
    batch = _mixed_batch(splits)
    texts = asyncio.run(_answer(model, adapters, batch, started))
    _write_answers(batch, texts, work_dir / "answers.jsonl")
    _print_answers(batch, texts)
    scores = _scores(batch, texts)
    _print_table(scores)
    _phase(started, "demo finished")
    failed = [task.name for task in TASKS if scores.tasks[task.name][task.name] < REQUIRED_SCORE]
    if failed:
        print(f"FAILED: {', '.join(failed)} scored under {REQUIRED_SCORE:.0%} on their own held-out prompts")
        return 1
    return 0


def _phase(started: float, what: str) -> None:
    elapsed = int(time.perf_counter() - started)
    print(f"[{elapsed // 60}:{elapsed % 60:02d}] {what}", flush=True)


def _train(task: Task, split: Split, model: Path, work_dir: Path) -> None:
    data = work_dir / "data" / task.name
    data.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        data=write_rows(split.train, data / "train.jsonl"),
        eval=write_rows(split.validation, data / "validation.jsonl"),
        output=work_dir / "adapters" / task.name,
        checkpoint_dir=work_dir / "checkpoints" / task.name,
        model=str(model),
        **TRAINING,
    )
    report = train(config).report
    print(f"  {report['steps']} steps of {BATCH} rows in {report['time']['train_seconds']:.0f} s, validation loss "
          f"{report['eval_before']['loss']:.3f} -> {report['eval_after']['loss']:.4f}", flush=True)


@dataclass(frozen=True)
class Request:
    """One request of the mixed batch: a task's held-out prompt, or a general question (task None), as one user
    message to one model."""

    model: str  # BASE_NAME or an adapter's name
    prompt: str
    task: Task | None
    reference: str | None = None

    @property
    def max_tokens(self) -> int:
        return self.task.max_tokens if self.task is not None else GENERAL_MAX_TOKENS


def _mixed_batch(splits: dict[str, Split]) -> list[Request]:
    """Every held-out prompt of every task to the base and to every adapter, and the general questions to each."""
    names = [BASE_NAME] + [task.name for task in TASKS]
    return ([Request(name, example.prompt, task, example.reference)
             for name in names for task in TASKS for example in splits[task.name].test]
            + [Request(name, prompt, None) for name in names for prompt in suite_prompts()[::GENERAL_EVERY]])


async def _answer(model: Path, adapters: Path, batch: list[Request], started: float) -> list[str]:
    """Serve the base and every adapter, send the whole batch at once, and return the answers in its order."""
    _phase(started, f"serving the base and {len(TASKS)} adapters (the first server on a machine compiles "
                    f"loradock's CPU kernels)")
    async with running_server(model, adapters) as url:
        print(f"  on {url}: one mixed batch of {len(batch)} requests, every held-out prompt and general question "
              f"to every model", flush=True)
        async with open_client(url, concurrency=len(batch)) as client:
            with tqdm(total=0, desc="answers", unit="req", dynamic_ncols=True) as bar:
                answers = await gather([client.answer(r.model, [{"role": "user", "content": r.prompt}], r.max_tokens)
                                        for r in batch], bar)
    return [answer.text for answer in answers]


def _write_answers(batch: list[Request], texts: list[str], path: Path) -> None:
    rows = [{"model": r.model, "task": r.task.name if r.task else "general", "prompt": r.prompt,
             "reference": r.reference, "answer": text} for r, text in zip(batch, texts)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _print_answers(batch: list[Request], texts: list[str]) -> None:
    """Every model's answer to the first held-out prompt of each task."""
    print("\nthe first held-out prompt of each task, as every model answered it in that batch:")
    for task in TASKS:
        prompt = next(r.prompt for r in batch if r.task is task)
        print(f"  {prompt!r}")
        for request, text in zip(batch, texts):
            if request.task is task and request.prompt == prompt:
                shown = text if len(text) <= SHOWN_ANSWER else text[:SHOWN_ANSWER] + "..."
                print(f"    {request.model:>10}: {shown!r}")


def _scores(batch: list[Request], texts: list[str]) -> Scores:
    """Each model's score per task (correct units over all units: rows, or fields for the JSON task), and each
    adapter's share of general questions answered exactly as the base answered them."""
    units: dict[tuple[str, str], Scored] = {}
    same: dict[str, list[bool]] = {}
    base = {r.prompt: text for r, text in zip(batch, texts) if r.task is None and r.model == BASE_NAME}
    for request, text in zip(batch, texts):
        if request.task is not None:
            scored = request.task.score(text, request.reference)
            so_far = units.get((request.model, request.task.name), Scored(0, 0))
            units[request.model, request.task.name] = Scored(so_far.correct + scored.correct,
                                                             so_far.total + scored.total)
        elif request.model != BASE_NAME:
            same.setdefault(request.model, []).append(text == base[request.prompt])
    models = dict.fromkeys(request.model for request in batch)
    return Scores({name: {task.name: units[name, task.name].value for task in TASKS} for name in models},
                  {name: sum(flags) / len(flags) for name, flags in same.items()}, len(base))


def _print_table(scores: Scores) -> None:
    metrics = "; ".join(f"{task.name}: {'JSON fields right' if task.metric == 'json-fields' else 'exact match'}"
                        for task in TASKS)
    print(f"\nscores on {TEST_EXAMPLES} held-out prompts per task ({metrics})\nand, under general, the share of "
          f"{scores.general_questions} general questions answered exactly as the base answers them (first "
          f"{GENERAL_MAX_TOKENS} tokens,\ngreedy); rows: who answers")
    print(" " * 12 + "".join(f"{task.name:>11}" for task in TASKS) + f"{'general':>11}")
    for name, row in scores.tasks.items():
        general = f"{scores.general[name]:.0%}" if name in scores.general else "-"
        print(f"{name:>12}" + "".join(f"{row[task.name]:>11.0%}" for task in TASKS) + f"{general:>11}")
