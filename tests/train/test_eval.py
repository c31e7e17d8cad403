"""`loradock eval`: the metrics, the intervals, bad rows, and the whole command against a live loradock server.

The tiny random model answers gibberish, but greedy answers are deterministic: the reference files are built from
one adapter's answers (fetched first with the openai client), so that adapter must score exactly 1.0 and the base,
whose answers are fetched too, exactly what its own answers earn.
"""

from __future__ import annotations

import json
import re

import pytest
from eval_support import eval_cli, greedy, write_jsonl
from server_support import MODEL_NAME, ServerThread

from loradock.train.data import DataError
from loradock.train.evaluate import load_eval_rows
from loradock.train.intervals import Z95, paired_comparison, score_summary, sign_test, wilson
from loradock.train.metrics import Scored, first_json_object, score

ADAPTER = "qv-r8"  # one of tests/lora_workload.ADAPTERS
MAX_TOKENS = 8
PROMPTS = ["def add(a, b):", "import os\nimport", "class Node:", "for i in range(", "x = [1, 2,", "while True:"]


def test_exact_and_contains_compare_stripped_text():
    assert score("exact", "  Paris\n", "Paris ") == Scored(1, 1)
    assert score("exact", "Paris.", "Paris") == Scored(0, 1)
    assert score("contains", "It is Paris, of course.", " Paris") == Scored(1, 1)
    assert score("contains", "It is Lyon.", "Paris") == Scored(0, 1)


def test_regex_searches_the_stripped_answer():
    assert score("regex", " the answer is 42\n", "", re.compile(r"\d+")) == Scored(1, 1)
    assert score("regex", " the answer is 42", "", re.compile(r"^\d+$")) == Scored(0, 1)
    assert score("regex", " 42 \n", "", re.compile(r"^\d+$")) == Scored(1, 1)


def test_json_fields_count_the_fields_of_the_first_object():
    reference = json.dumps({"city": "Paris", "population": 2100000, "capital": True})
    answer = 'Sure: {"city": "Paris", "population": 2.1e6, "capital": false} and {"city": "Rome"}'
    assert score("json-fields", answer, reference) == Scored(2, 3)  # 2.1e6 == 2100000; false != true
    assert score("json-fields", "no object { here", reference) == Scored(0, 3)
    assert first_json_object('{"a": [1, {"b": 2}]} tail') == {"a": [1, {"b": 2}]}
    assert first_json_object('[1, 2] then {bad} then {"ok": 1}') == {"ok": 1}


def test_the_wilson_interval_has_its_known_values():
    low, high = wilson(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson(12, 12) == (pytest.approx(12 / (12 + Z95**2)), 1.0)  # k = n: the low end is n / (n + z²)
    assert wilson(0, 12) == (pytest.approx(0.0), pytest.approx(Z95**2 / (12 + Z95**2)))


def test_json_fields_intervals_are_a_seeded_bootstrap_over_rows():
    scores = [Scored(c, 4) for c in (4, 3, 0, 2, 4, 1, 3, 4, 2, 0)]
    summary = score_summary(scores, row_level=False, seed=7)
    assert summary["score"] == 23 / 40 and summary["interval"] == "bootstrap over rows"
    low, high = summary["ci95"]
    assert 0 < low < 23 / 40 < high < 1
    assert score_summary(scores, row_level=False, seed=7)["ci95"] == [low, high]
    # Fields of one row succeed together here: Wilson over the 40 fields would claim a much narrower interval.
    wilson_low, wilson_high = wilson(23, 40)
    assert high - low > 1.3 * (wilson_high - wilson_low)


def test_the_paired_comparison_counts_rows_and_signs():
    model = [Scored(1, 1)] * 9 + [Scored(0, 1)]
    baseline = [Scored(0, 1)] * 8 + [Scored(1, 1)] * 2
    result = paired_comparison(model, baseline, seed=0)
    assert (result["better"], result["worse"], result["same"]) == (8, 1, 1)
    assert result["difference"] == pytest.approx(0.7)
    assert result["ci95"][0] < 0.7 < result["ci95"][1]
    assert result["sign_test_p"] == pytest.approx(2 * 10 / 2**9)  # P(X <= 1), X ~ Bin(9, 1/2), two-sided
    assert sign_test(8, 0) == pytest.approx(2 / 2**8) and sign_test(0, 0) == 1.0


def test_bad_eval_rows_are_listed_with_file_and_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    write_jsonl(path, [
        {"prompt": "ok", "completion": "{\"a\": 1}"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},
                      {"role": "user", "content": "and?"}]},
        {"messages": [{"role": "assistant", "content": "x"}]},
        {"prompt": "p", "completion": "not json"},
        {"prompt": "p", "completion": "{\"a\": 1}", "pattern": "("},
        "{broken",
    ])
    with pytest.raises(DataError) as caught:
        load_eval_rows(path, "json-fields")
    message = str(caught.value)
    assert message.startswith(f"5 bad row(s) in {path}")
    for line, why in [(2, "last message must be the assistant's"), (3, "no message before the reference"),
                      (4, "reference answer to be a JSON object"), (5, "not a valid regular expression"),
                      (6, "not valid JSON")]:
        assert f"{path}:{line}: " in message and why in message
    assert f"{path}:1:" not in message


def test_the_regex_metric_needs_a_pattern(tmp_path):
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"eval.jsonl:1: the regex metric needs --pattern"):
        load_eval_rows(tmp_path / "eval.jsonl", "regex")
    assert load_eval_rows(tmp_path / "eval.jsonl", "regex", pattern="c$")[0].pattern.pattern == "c$"


@pytest.fixture(scope="module")
def server(model_dir, adapter_dir):
    with ServerThread(model_dir("llama"), adapter_dir) as running:
        yield running


@pytest.fixture(scope="module")
def answers(server):
    """{model: [answer per PROMPTS item as a completion, then per item as one chat message]}."""
    prompts = PROMPTS + [[{"role": "user", "content": p}] for p in PROMPTS]
    return {model: [greedy(server.url, model, p, MAX_TOKENS) for p in prompts] for model in (ADAPTER, MODEL_NAME)}


def reference_rows(answers: list[str], reference=lambda answer: answer, **extra) -> list[dict]:
    """Half completion rows, half chat rows, over PROMPTS, with reference(answer) as the reference."""
    rows = [{"prompt": p, "completion": reference(a), **extra} for p, a in zip(PROMPTS, answers)]
    rows += [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": reference(a)}], **extra}
             for p, a in zip(PROMPTS, answers[len(PROMPTS) :])]
    return rows


def run_eval(server, tmp_path, rows, *flags) -> tuple[dict, list[dict]]:
    write_jsonl(tmp_path / "eval.jsonl", rows)
    status = eval_cli("--url", server.url, "--model", ADAPTER, "--baseline", MODEL_NAME, "--data",
                      str(tmp_path / "eval.jsonl"), "--max-tokens", str(MAX_TOKENS),
                      "--out", str(tmp_path / "report.json"), "--rows", str(tmp_path / "rows.jsonl"), *flags)
    assert status == 0
    report = json.loads((tmp_path / "report.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    return report, records


def test_exact_scores_the_answering_adapter_one_and_the_base_its_own_share(server, answers, tmp_path):
    report, records = run_eval(server, tmp_path, reference_rows(answers[ADAPTER]), "--metric", "exact")
    rows = len(answers[ADAPTER])
    base_hits = sum(b.strip() == a.strip() for a, b in zip(answers[ADAPTER], answers[MODEL_NAME]))
    assert base_hits < rows  # the adapter changes the base's answers
    adapter, base = report["models"][ADAPTER], report["models"][MODEL_NAME]
    assert (adapter["score"], adapter["correct"], adapter["total"]) == (1.0, rows, rows)
    assert adapter["ci95"] == [pytest.approx(rows / (rows + Z95**2)), 1.0] and adapter["interval"] == "wilson"
    assert base["score"] == base_hits / rows and base["ci95"] == pytest.approx(list(wilson(base_hits, rows)))
    comparison = report["comparison"]
    assert comparison["difference"] == pytest.approx(1 - base_hits / rows)
    assert (comparison["better"], comparison["worse"], comparison["same"]) == (rows - base_hits, 0, base_hits)
    assert [r["results"][ADAPTER]["answer"] for r in records] == answers[ADAPTER]
    assert [r["results"][MODEL_NAME]["answer"] for r in records] == answers[MODEL_NAME]
    assert records[0]["source"].endswith("eval.jsonl:1")


def test_contains_finds_a_piece_of_the_answer(server, answers, tmp_path):
    pieces = reference_rows(answers[ADAPTER], lambda answer: answer.strip()[1:4])
    report, _records = run_eval(server, tmp_path, pieces, "--metric", "contains")
    expected = sum(row_reference(row).strip() in b for row, b in zip(pieces, answers[MODEL_NAME]))
    assert report["models"][ADAPTER]["score"] == 1.0
    assert report["models"][MODEL_NAME]["score"] == expected / len(pieces) < 1.0


def row_reference(row: dict) -> str:
    return row["completion"] if "completion" in row else row["messages"][-1]["content"]


def test_regex_uses_the_rows_own_pattern_before_the_flag(server, answers, tmp_path):
    rows = reference_rows(answers[ADAPTER])
    for row, answer in zip(rows, answers[ADAPTER]):
        row["pattern"] = "^" + re.escape(answer.strip()[:3])
    rows[0].pop("pattern")  # this row falls back to --pattern, which matches nothing
    report, records = run_eval(server, tmp_path, rows, "--metric", "regex", "--pattern", "^NEVER$")
    assert report["models"][ADAPTER]["correct"] == len(rows) - 1
    assert records[0]["results"][ADAPTER]["correct"] == 0


def test_json_fields_on_gibberish_score_no_field(server, answers, tmp_path):
    rows = reference_rows(answers[ADAPTER], lambda _answer: json.dumps({"name": "x", "size": 3}))
    report, records = run_eval(server, tmp_path, rows, "--metric", "json-fields")
    adapter = report["models"][ADAPTER]
    assert (adapter["correct"], adapter["total"], adapter["interval"]) == (0, 2 * len(rows), "bootstrap over rows")
    assert adapter["ci95"] == [0.0, 0.0]
    assert all(r["results"][ADAPTER]["total"] == 2 for r in records)


def test_an_unknown_model_is_an_error_not_a_score(server, tmp_path, capsys):
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "x", "completion": "y"}])
    assert eval_cli("--url", server.url, "--model", "no-such-adapter", "--data", str(tmp_path / "eval.jsonl")) == 1
    assert "no-such-adapter" in capsys.readouterr().err
