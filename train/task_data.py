"""The demo's tasks as files, for the fine-tuning loop in the README (SFT, eval, gate, DPO on your own machine):

    python -m loradock.train.task_data DIR

writes, per task, `NAME-train.jsonl` (128 rows), `NAME-val.jsonl` (16) and `NAME-test.jsonl` (25), the trainer's chat
rows; and `sentiment-pairs-train.jsonl` (96) / `sentiment-pairs-test.jsonl` (32), preference rows for `--method dpo`:
the right label chosen, the flipped one rejected, from a second seeded stream of reviews (the review space is
small: some repeat SFT rows; the held-out pairs never repeat the trained ones).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .tasks import TASKS, Example, make_split, write_rows

FLIPPED = {"SENTIMENT: positive": "SENTIMENT: negative", "SENTIMENT: negative": "SENTIMENT: positive"}


def preference_row(example: Example) -> dict:
    row = example.row()
    return {"messages": row["messages"][:-1], "chosen": example.reference, "rejected": FLIPPED[example.reference]}


def write_task_data(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in TASKS:
        split = make_split(task, 0, 128, 16, 25)
        for part, examples in (("train", split.train), ("val", split.validation), ("test", split.test)):
            written.append(write_rows(examples, out / f"{task.name}-{part}.jsonl"))
    sentiment = next(task for task in TASKS if task.name == "sentiment")
    pairs = make_split(sentiment, 1, 96, 0, 32)
    for part, examples in (("train", pairs.train), ("test", pairs.test)):
        path = out / f"sentiment-pairs-{part}.jsonl"
        path.write_text("".join(json.dumps(preference_row(e)) + "\n" for e in examples), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loradock.train.task_data", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the JSONL files into")
    for path in write_task_data(parser.parse_args(argv).out):
        print(path)


if __name__ == "__main__":
    main()
