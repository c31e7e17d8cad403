"""`loradock demo`: the whole system in one command, offline, in about a minute on two CPU cores.

It builds the demo model if needed, trains one LoRA adapter per bundled task with the bundled trainer, starts the
server with all of them, sends one mixed batch (every task's prompt to every adapter and to the base, all at once)
and prints the answers, then scores every model on every task's held-out prompts through the server and prints
the exact-match table. It exits 1 if an adapter answers under 90% of its own held-out prompts.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

from ..serve.demo_model import demo_model_path
from ..serve.engine.threads import use_serving_threads
from .config import TrainConfig
from .demo_server import BASE_NAME, Query, ask_all, running_server
from .tasks import TASKS, Task, make_prompts, write_rows
from .trainer import train

REQUIRED_SCORE = 0.9
SEED = 0
TRAIN_PROMPTS, VALIDATION_PROMPTS, TEST_PROMPTS = 2048, 64, 100
MAX_TOKENS = 8
# One adapter's training: a few hundred steps of LoRA on every linear layer (measured in the README).
TRAINING = {"rank": 16, "alpha": 32, "dropout": 0.0, "lr": 3e-3, "scheduler": "cosine", "warmup": 10, "batch_size": 16,
            "max_steps": 250, "eval_steps": 50, "max_seq_len": 64, "seed": SEED, "quiet": True}


def run(work_dir: Path | None = None) -> int:
    """Run the demo in `work_dir` (kept), or in a temporary folder (removed). Returns the exit status."""
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loradock-demo-")))
        return _run(Path(work_dir))


def _run(work_dir: Path) -> int:
    started = time.perf_counter()
    model = demo_model_path()
    print(f"demo model: {model} (ready after {time.perf_counter() - started:.0f} s)")
    prompts = make_prompts(SEED, TRAIN_PROMPTS, VALIDATION_PROMPTS, TEST_PROMPTS)
    adapters = work_dir / "adapters"
    if adapters.exists():
        raise ValueError(f"{work_dir} holds a previous demo's adapters: give an empty or new --work-dir")
    for task in TASKS:
        _train(task, prompts, model, work_dir, adapters)
    use_serving_threads()  # training took every core; serving leaves one to the event loop
    scores = asyncio.run(_serve_and_score(model, adapters, prompts.test))
    _print_scores(scores)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    failed = [task.name for task in TASKS if scores[task.name][task.name] < REQUIRED_SCORE]
    if failed:
        print(f"FAILED: {', '.join(failed)} answered under {REQUIRED_SCORE:.0%} of their own held-out prompts")
        return 1
    return 0


def _train(task: Task, prompts, model: Path, work_dir: Path, adapters: Path) -> None:
    data = work_dir / "data" / task.name
    data.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        data=write_rows(task, prompts.train, data / "train.jsonl"),
        eval=write_rows(task, prompts.validation, data / "validation.jsonl"),
        output=adapters / task.name,
        checkpoint_dir=work_dir / "checkpoints" / task.name,
        model=str(model),
        **TRAINING,
    )
    print(f"training adapter {task.name!r}: answer with the prompt's {task.category} ...", flush=True)
    report = train(config).report
    print(f"  {report['steps']} steps in {report['time']['train_seconds']:.0f} s "
          f"({report['time']['steps_per_second']:.1f} steps/s), validation loss "
          f"{report['eval_before']['loss']:.2f} -> {report['eval_after']['loss']:.3f}", flush=True)


async def _serve_and_score(model: Path, adapters: Path, test: list[str]) -> dict[str, dict[str, float]]:
    """Start the server; print a mixed batch; return {model: {task: exact match on the task's held-out prompts}}."""
    models = [BASE_NAME] + [task.name for task in TASKS]
    async with running_server(model, adapters) as url:
        print(f"\nserver on {url}: the base model and {len(TASKS)} adapters")
        shown = test[: len(TASKS)]
        batch = [Query(name, prompt, chat=True) for prompt in shown for name in models]
        answers = await ask_all(url, batch, MAX_TOKENS)
        print(f"\none mixed batch: {len(batch)} requests at once, every prompt to every model")
        for index, prompt in enumerate(shown):
            print(f"  {prompt!r}")
            for name, answer in zip(models, answers[index * len(models) : (index + 1) * len(models)]):
                print(f"    {name:>10}: {answer!r}")
        queries = [Query(name, prompt, chat=True) for name in models for prompt in test]
        answers = await ask_all(url, queries, MAX_TOKENS)
    scores = {}
    for index, name in enumerate(models):
        mine = answers[index * len(test) : (index + 1) * len(test)]
        scores[name] = {task.name: sum(a.strip() == task.answer(p) for a, p in zip(mine, test)) / len(test)
                        for task in TASKS}
    return scores


def _print_scores(scores: dict[str, dict[str, float]]) -> None:
    print(f"\nexact match on {TEST_PROMPTS} held-out prompts per task (rows: who answers; columns: the task)")
    print(" " * 12 + "".join(f"{task.name:>10}" for task in TASKS))
    for name, row in scores.items():
        print(f"{name:>12}" + "".join(f"{row[task.name]:>10.0%}" for task in TASKS))
