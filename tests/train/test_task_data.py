"""`python -m loradock.train.task_data DIR`, the README loop's data: run from the repository root as a user would;
the rows pass the trainer's own checks (SFT rows and DPO pairs), and the held-out pairs are not trained on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loradock.train.data import check_row, check_rows
from loradock.train.dpo import check_pair

ROOT = Path(__file__).resolve().parents[2]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_task_data_writes_the_loops_files(tmp_path):
    done = subprocess.run([sys.executable, "-m", "loradock.train.task_data", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    sizes = {path.name: len(rows(path)) for path in tmp_path.iterdir()}
    assert sizes == {**{f"{task}-{part}.jsonl": n for task in ("extract", "sentiment", "bullets")
                        for part, n in (("train", 128), ("val", 16), ("test", 25))},
                     "sentiment-pairs-train.jsonl": 96, "sentiment-pairs-test.jsonl": 32}
    for name in sizes:
        check_rows(tmp_path / name, check_pair if "pairs" in name else check_row)  # raises on a bad row

    train, test = rows(tmp_path / "sentiment-pairs-train.jsonl"), rows(tmp_path / "sentiment-pairs-test.jsonl")
    prompts = [[pair["messages"][0]["content"] for pair in part] for part in (train, test)]
    assert not set(prompts[0]) & set(prompts[1])  # the held-out pairs are held out
    pairs = train + test
    labels = {"SENTIMENT: positive", "SENTIMENT: negative"}
    assert all({pair["chosen"], pair["rejected"]} == labels for pair in pairs)
    assert {pair["chosen"] for pair in pairs} == labels  # both labels are chosen somewhere
