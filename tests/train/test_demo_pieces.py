"""The pieces of `loradock demo` (its whole run takes minutes and checks its own 90% scores, exiting 1 below them):
the generated task data and its scoring, the in-process server the mixed batch goes to, the trainer's terminal
output, and the run itself shrunk onto the tiny model. Each test here takes a few seconds on the tiny model (about
10 s for the shrunk run), or none."""

from __future__ import annotations

import asyncio
import json
import re

from loradock.loadtest.random_adapters import write_random_adapter
from loradock.train import demo
from loradock.train.config import TrainConfig
from loradock.train.demo_server import BASE_NAME, running_server
from loradock.train.openai_client import gather, open_client
from loradock.train.tasks import COMPLAINTS, PRAISE, TASKS, make_split, write_rows
from loradock.train.trainer import train

EXTRACT, SENTIMENT, BULLETS = TASKS


def test_each_task_draws_the_same_disjoint_sets_from_its_seed():
    for task in TASKS:
        split = make_split(task, seed=0, train=200, validation=20, test=30)
        assert split == make_split(task, seed=0, train=200, validation=20, test=30)
        sets = [{e.prompt for e in part} for part in (split.train, split.validation, split.test)]
        assert [len(s) for s in sets] == [200, 20, 30]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]), task.name
        assert split != make_split(task, seed=1, train=200, validation=20, test=30)


def test_the_references_follow_from_their_prompts():
    for example in make_split(EXTRACT, seed=0, train=0, validation=0, test=50).test:
        person = json.loads(example.reference)
        assert list(person) == ["name", "age", "city"]
        assert all(str(value) in example.prompt for value in person.values())
    for example in make_split(SENTIMENT, seed=0, train=0, validation=0, test=50).test:
        words = set(re.findall(r"\w+", example.prompt))
        label = "positive" if words & set(PRAISE) else "negative"
        assert not (words & set(PRAISE) and words & set(COMPLAINTS))
        assert example.reference == f"SENTIMENT: {label}"
    for example in make_split(BULLETS, seed=0, train=0, validation=0, test=50).test:
        items = [line.removeprefix("- ") for line in example.reference.split("\n")]
        assert 2 <= len(items) <= 4 and all(line.startswith("- ") for line in example.reference.split("\n"))
        positions = [example.prompt.index(item) for item in items]
        assert positions == sorted(positions), example  # in the prompt's order


def test_answers_are_scored_exactly_or_field_by_field():
    person = '{"name": "Aiko Tanaka", "age": 34, "city": "Osaka"}'
    assert EXTRACT.score('{"city": "Osaka", "age": 34, "name": "Aiko Tanaka"}', person).value == 1.0
    assert (EXTRACT.score('Here: {"name": "Aiko Tanaka", "age": "34", "location": "Osaka"}', person).correct,
            EXTRACT.score("Aiko Tanaka is 34.", person).correct) == (1, 0)
    assert SENTIMENT.score(" SENTIMENT: positive\n", "SENTIMENT: positive").value == 1.0
    assert SENTIMENT.score("The sentiment is positive.", "SENTIMENT: positive").value == 0.0
    assert BULLETS.score("- tea\n- tent", "- tea\n- tent\n- map").value == 0.0


def test_the_demo_server_serves_a_mixed_batch_of_chat_and_completions(tmp_path, model_dir):
    adapters = tmp_path / "adapters"
    write_random_adapter(model_dir("llama"), adapters / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    prompts = ["open path int", "read line str", "copy file dict"]

    async def mixed_batch():
        async with running_server(model_dir("llama"), adapters) as url, open_client(url, concurrency=12) as client:
            requests = [client.answer(model, [{"role": "user", "content": text}] if chat else text, 4)
                        for model in (BASE_NAME, "a") for text in prompts for chat in (True, False)]
            return [answer.text for answer in await gather(requests)]

    answers = asyncio.run(mixed_batch())
    assert len(answers) == 12 and all(isinstance(a, str) for a in answers)
    assert answers[:6] != answers[6:]  # the adapter changes what the model says


def test_the_trainer_shows_one_bar_with_the_loss_and_evaluation_lines_not_dicts(tmp_path, model_dir, capsys):
    rows = make_split(SENTIMENT, seed=0, train=16, validation=4, test=0)
    config = TrainConfig(data=write_rows(rows.train, tmp_path / "train.jsonl"),
                         eval=write_rows(rows.validation, tmp_path / "validation.jsonl"), output=tmp_path / "words",
                         model=str(model_dir("llama")), max_steps=4, batch_size=4, eval_steps=2, dropout=0.0)
    train(config)
    shown = capsys.readouterr()
    output = shown.out + shown.err
    assert re.search(r"words: step 2: validation loss \d+\.\d{4}\n", output)
    assert "step 4:" not in output  # the last evaluation is the summary's "after"
    assert re.search(r"words: 100%\|.*\| 4/4 .*loss \d+\.\d{4}\]", output)
    assert "{'" not in output and "Loading weights" not in output


def test_the_demo_runs_end_to_end_and_fails_when_an_adapter_scores_under_90_percent(tmp_path, model_dir, monkeypatch,
                                                                                      capsys):
    """The whole run, shrunk (2 steps per adapter, 2 held-out prompts per task, 5 general questions) and on the tiny
    random model, where no adapter can learn its task: it exits 1 and says which ones failed."""
    monkeypatch.setattr(demo, "resolve_model_path", lambda model: model_dir("llama"))
    monkeypatch.setattr(demo, "STEPS", 2)
    monkeypatch.setattr(demo, "TRAINING", {**demo.TRAINING, "max_steps": 2})
    monkeypatch.setattr(demo, "TEST_EXAMPLES", 2)
    monkeypatch.setattr(demo, "GENERAL_EVERY", 8)
    assert demo.run(tmp_path) == 1
    output = capsys.readouterr().out
    header = re.search(r"^ +extract +sentiment +bullets +general$", output, re.MULTILINE)
    rows = output[header.end():].split("\n")[1:5]
    assert [row.split()[0] for row in rows] == [BASE_NAME, "extract", "sentiment", "bullets"]
    assert all(re.fullmatch(r" *\S+( +\d+%){3} +(-|\d+%)", row) for row in rows), rows
    assert "FAILED: extract, sentiment, bullets scored under 90%" in output
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 * (3 * 2 + 5)  # every model: two prompts of each task, five general questions
    assert sorted({(a["model"], a["task"]) for a in answers if a["task"] != "general"}) == sorted(
        (model, task.name) for model in (BASE_NAME, "extract", "sentiment", "bullets") for task in TASKS)
