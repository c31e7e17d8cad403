"""The gate before registration: its language, its errors before training, and `loradock train --gate --register`
end to end: a tiny adapter that learnt to answer "cat" passes "score>=0.9" and is registered into a live server;
one that learnt nothing fails and stays out."""

from __future__ import annotations

import json
import random
import urllib.request

import pytest
from eval_support import write_jsonl
from server_support import ADMIN_TOKEN, ServerThread

from loradock.cli import main
from loradock.train.gate import Condition, check_gate, failures, parse_gate

WORDS = ["cat", "dog", "sun", "red", "map", "key", "one", "two"]


def test_the_gate_language():
    assert parse_gate("score>=0.9, kl <= 0.2,score_lo>.5,ppl_ratio<1.1e0,agreement>=-1") == [
        Condition("score", ">=", 0.9), Condition("kl", "<=", 0.2), Condition("score_lo", ">", 0.5),
        Condition("ppl_ratio", "<", 1.1), Condition("agreement", ">=", -1.0)]
    for bad, why in [("score=>0.9", "not 'name op number'"), ("score>=", "not 'name op number'"),
                     ("loss<1", "unknown measure 'loss'"), ("score>=0.9,", "'' is not"), ("score>=0.9 kl<=1", "not")]:
        with pytest.raises(ValueError, match=why):
            parse_gate(bad)


def test_the_check_names_each_failed_condition_with_its_value():
    result = check_gate(parse_gate("score>=0.9,kl<=0.2,agreement>0.5"), {"score": 0.95, "kl": 0.31, "agreement": 0.5})
    assert not result["passed"]
    assert [c["passed"] for c in result["checks"]] == [True, False, False]
    assert failures(result) == ["kl<=0.2 failed: kl = 0.31", "agreement>0.5 failed: agreement = 0.5"]
    assert check_gate(parse_gate("score>=0.9"), {"score": 0.9})["passed"]


def write_cat_rows(path, count: int, seed: int, answer: str = " cat"):
    """Prompt rows of random words, every completion the same word."""
    rng = random.Random(seed)
    write_jsonl(path, [{"prompt": " ".join(rng.choice(WORDS) for _ in range(4)) + " =", "completion": answer}
                       for _ in range(count)])
    return path


def train_cli(tmp_path, model, name: str, *flags: str) -> int:
    data = write_cat_rows(tmp_path / "train.jsonl", 64, seed=0)
    return main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / name),
                 "--batch-size", "8", "--rank", "8", "--dropout", "0", "--warmup", "0", "--eval-max-tokens", "4",
                 *flags])


def test_gate_mistakes_are_reported_before_training(tmp_path, capsys):
    missing = str(tmp_path / "no-model")  # loading it would fail: the run must stop before
    assert train_cli(tmp_path, missing, "a", "--gate", "score>0.9,los<1", "--eval-data", "x.jsonl") == 2
    assert "unknown measure 'los'" in capsys.readouterr().err
    assert train_cli(tmp_path, missing, "a", "--gate", "score>=0.9") == 2
    assert "--gate names the task score: give the rows to score with --eval-data" in capsys.readouterr().err


def test_bad_eval_rows_are_listed_before_the_model_loads(tmp_path, capsys):
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p"},
                                          {"messages": [{"role": "user", "content": "no answer"}]}])
    status = train_cli(tmp_path, tmp_path / "no-model", "a", "--eval-data", str(tmp_path / "eval.jsonl"))
    error = capsys.readouterr().err
    assert status == 2 and "2 bad row(s)" in error
    assert f"{tmp_path / 'eval.jsonl'}:2: " in error and f"{tmp_path / 'eval.jsonl'}:3: " in error
    assert "no-model" not in error


@pytest.fixture(scope="module")
def registry(model_dir):
    """A live server to register adapters into (they live outside its adapter directory)."""
    with ServerThread(model_dir("llama"), allow_adapter_paths=True) as server:
        yield server


def served(server) -> set[str]:
    with urllib.request.urlopen(server.url + "/v1/models", timeout=30) as response:
        return {model["id"] for model in json.loads(response.read())["data"]}


def gated_train(tmp_path, model_dir, registry, name: str, *flags: str) -> int:
    held_out = write_cat_rows(tmp_path / "eval.jsonl", 10, seed=1, answer="cat")
    return train_cli(tmp_path, model_dir("llama"), name, "--eval-data", str(held_out), "--gate", "score>=0.9",
                     "--register", registry.url, "--admin-token", ADMIN_TOKEN, *flags)


def test_a_failing_gate_keeps_the_adapter_out_of_the_server(tmp_path, model_dir, registry, capsys):
    assert gated_train(tmp_path, model_dir, registry, "untrained", "--max-steps", "1", "--lr", "1e-7") == 1
    assert "score>=0.9 failed: score = 0" in capsys.readouterr().err
    assert "untrained" not in served(registry)
    report = json.loads((tmp_path / "untrained" / "training_report.json").read_text())
    assert report["gate"]["checks"] == [{"condition": "score>=0.9", "measure": "score", "value": 0.0, "passed": False}]
    assert report["evaluation"]["models"]["untrained"]["rows"] == 10


def test_a_passing_gate_registers_the_adapter(tmp_path, model_dir, registry, capsys):
    assert gated_train(tmp_path, model_dir, registry, "cat", "--max-steps", "8", "--lr", "1e-2") == 0
    assert "gate passed: score>=0.9" in capsys.readouterr().out
    assert "cat" in served(registry)
    report = json.loads((tmp_path / "cat" / "training_report.json").read_text())
    assert report["gate"]["passed"] and report["evaluation"]["models"]["cat"]["score"] >= 0.9


def test_a_forgetting_gate_measures_the_adapter_against_the_base(tmp_path, model_dir):
    """Needs the server to score a text: /v1/completions with "echo": true and "logprobs"."""
    status = train_cli(tmp_path, model_dir("llama"), "forgetful", "--max-steps", "4", "--lr", "1e-2",
                       "--gate", "agreement>=0,kl<=1000,ppl_ratio<=1000")
    assert status == 0
    report = json.loads((tmp_path / "forgetful" / "training_report.json").read_text())
    assert {c["measure"] for c in report["gate"]["checks"]} == {"agreement", "kl", "ppl_ratio"}
    assert report["evaluation"]["forgetting"]["kl"] > 0 and report["evaluation"]["models"] == {}
    assert (tmp_path / "forgetful" / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
