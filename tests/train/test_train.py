"""The trainer end to end on a tiny model: loss goes down, the adapter is PEFT's own format, the server's validation
accepts it, the server (hot-loaded through the admin API) and PEFT give the same tokens, resume, early stopping,
targets, quantized training, packing, the CLI and its YAML."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import urllib.request
from dataclasses import replace

import pytest
import torch
from loradock.adapters.peft_format import BaseModelInfo, read_adapter
from loradock.cli import apply_config_file, build_parser
from loradock.serve.engine import SamplingParams
from loradock.serve.models.loader import load_model
from loradock.train.batching import ExampleDataset, PadCollator, make_collator
from loradock.train.commands import train_config
from loradock.train.config import TrainConfig
from loradock.train.data import RowEncoder
from loradock.train.model import resolve_targets
from loradock.train.register import register_adapter
from loradock.train.trainer import train
from safetensors.torch import load_file
from server_support import ADMIN_TOKEN, ServerThread, free_port
from support import collect, peft_greedy, start_engine

WORDS = ["cat", "dog", "sun", "red", "map", "key"]


def write_rows(path, count: int, seed: int, upper: bool = True):
    """Rows whose completion is the prompt's words in upper case (or reversed, with upper=False)."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for index in range(count):
            words = [rng.choice(WORDS) for _ in range(3)]
            answer = " ".join(words).upper() if upper else " ".join(reversed(words))
            if index % 2:
                row = {"prompt": " ".join(words) + " =", "completion": " " + answer}
            else:
                row = {"messages": [{"role": "user", "content": " ".join(words)}, {"role": "assistant", "content": answer}]}
            handle.write(json.dumps(row) + "\n")
    return path


def config(tmp_path, model, name="adapter", **options) -> TrainConfig:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_rows(data, 48, seed=0)
    options = {"max_steps": 8, "batch_size": 8, "lr": 1e-2, "rank": 8, "alpha": 16, "dropout": 0.0, "quiet": True,
               "warmup": 0, **options}
    return TrainConfig(data=data, output=tmp_path / name, model=str(model), **options)


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    """One adapter trained on the tiny llama, shared by the tests that only look at it."""
    tmp_path = tmp_path_factory.mktemp("trained")
    return train(config(tmp_path, model_dir("llama")))


def test_training_lowers_the_validation_loss_and_reports_it(trained):
    report = trained.report
    assert report["eval_after"]["loss"] < report["eval_before"]["loss"] - 1.0
    assert report["eval_after"]["perplexity"] < report["eval_before"]["perplexity"]
    assert report["steps"] == 8 and report["time"]["steps_per_second"] > 0
    assert report["losses"]["eval"][0] == {"step": 0, "loss": report["eval_before"]["loss"]}
    assert report["losses"]["train"] and report["data"]["train"]["examples"] == 44  # 48 rows, 10% held out
    written = json.loads((trained.output / "training_report.json").read_text())
    assert written["base_model"]["fingerprint"]["sha256"] == report["base_model"]["fingerprint"]["sha256"]
    assert (trained.output / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_adapter_is_plain_peft_lora_the_server_accepts(trained, model_dir):
    adapter_config = json.loads((trained.output / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["bias"] == "none"
    assert not adapter_config["modules_to_save"]
    assert sorted(adapter_config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                        "up_proj", "v_proj"]
    assert not (trained.output / "adapter_model.bin").exists()
    base, _ = load_model(model_dir("llama"), "none", torch.float32, torch.device("cpu"))
    weights = read_adapter(trained.output, BaseModelInfo.from_model(base))
    assert len(weights.modules) == 2 * 7 and weights.max_rank == 8
    assert any(module.B.abs().max() > 0 for module in weights.modules.values())  # trained, not peft's zero B
    assert not list(trained.output.parent.glob(".*writing*"))  # the staging folder is gone


def test_hot_loaded_into_the_server_it_answers_as_peft_does(trained, model_dir, tokenizer):
    prompts = [tokenizer("cat dog sun =").input_ids, tokenizer("red key map =").input_ids]
    expected = peft_greedy(model_dir("llama"), trained.output, prompts, 6, ignore_eos=True)
    with ServerThread(model_dir("llama"), allow_adapter_paths=True) as server:
        status, body = register_adapter(server.url, "upper", trained.output, ADMIN_TOKEN)
        assert status == 201, body
        assert json.loads(body)["name"] == "upper"
        for prompt, tokens in zip(prompts, expected):
            answer = post(server.url + "/v1/completions", {"model": "upper", "prompt": prompt, "max_tokens": 6,
                                                           "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            assert answer["choices"][0]["token_ids"] == tokens
        assert register_adapter(server.url, "upper", trained.output, "wrong-token")[0] == 401


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_resume_continues_from_the_checkpoint(tmp_path, model_dir):
    model = model_dir("llama")
    whole = train(config(tmp_path, model, "whole", scheduler="constant", eval_steps=2))
    checkpoints = tmp_path / "checkpoints"
    train(config(tmp_path, model, "first-half", scheduler="constant", max_steps=4, eval_steps=2,
                 checkpoint_dir=checkpoints))
    resumed = train(config(tmp_path, model, "resumed", scheduler="constant", eval_steps=2, checkpoint_dir=checkpoints,
                           resume=True))
    assert resumed.report["resumed_from"] == str(checkpoints / "checkpoint-4")
    assert resumed.report["steps"] == 8
    expected, got = load_file(whole.output / "adapter_model.safetensors"), load_file(resumed.output / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    with pytest.raises(ValueError, match="no checkpoint"):
        train(config(tmp_path, model, "nothing", resume=True, checkpoint_dir=tmp_path / "empty"))


def test_early_stopping_stops_after_patience_and_keeps_the_best(tmp_path, model_dir):
    # Validation asks for the reverse of what training teaches, so its loss soon stops falling.
    held_out = write_rows(tmp_path / "eval.jsonl", 8, seed=1, upper=False)
    result = train(config(tmp_path, model_dir("llama"), max_steps=40, eval_steps=2, early_stopping=2, eval=held_out))
    evals = result.report["losses"]["eval"][1:]  # [0] is the evaluation before training
    best, since_best = evals[0]["loss"], 0
    for point in evals[1:]:
        best, since_best = (point["loss"], 0) if point["loss"] < best else (best, since_best + 1)
        if since_best == 2:
            break
    assert result.report["steps"] == point["step"] < 40
    assert result.report["eval_after"]["loss"] == pytest.approx(best)


def test_targets_are_resolved_against_the_base(model_dir, tmp_path):
    base, _ = load_model(model_dir("llama"), "none", torch.float32, torch.device("cpu"))
    info = BaseModelInfo.from_model(base)
    assert resolve_targets("v_proj, q_proj", info) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="output head"):
        resolve_targets("lm_head", info)
    with pytest.raises(ValueError, match="names no linear layer.*q_proj"):
        resolve_targets("qproj", info)
    result = train(config(tmp_path, model_dir("qwen2"), targets="q_proj,v_proj", max_steps=2))
    assert sorted(json.loads((result.output / "adapter_config.json").read_text())["target_modules"]) == ["q_proj", "v_proj"]


def test_nf4_quantized_training_with_checkpointing_writes_a_servable_adapter(tmp_path, model_dir):
    result = train(config(tmp_path, model_dir("llama"), quantize="nf4", gradient_checkpointing=True, max_steps=4))
    assert result.report["base_model"]["quantize"] == "nf4"
    assert result.report["eval_after"]["loss"] < result.report["eval_before"]["loss"]
    assert (result.output / "adapter_model.safetensors").is_file()


def test_dora_from_the_cli_writes_an_adapter_the_engine_serves_as_peft_does(tmp_path, model_dir, tokenizer):
    write_rows(tmp_path / "rows.jsonl", 16, seed=0)
    args = build_parser().parse_args(["train", "--model", str(model_dir("llama")), "--data", str(tmp_path / "rows.jsonl"),
                                      "--output", str(tmp_path / "adapters" / "dora"), "--dora", "--max-steps", "2",
                                      "--targets", "q_proj,v_proj,down_proj", "--lr", "1e-2", "--batch-size", "8"])
    result = train(replace(train_config(args), quiet=True))
    assert json.loads((result.output / "adapter_config.json").read_text())["use_dora"] is True
    assert result.report["lora"]["dora"] is True
    magnitudes = [name for name in load_file(result.output / "adapter_model.safetensors") if "magnitude" in name]
    assert len(magnitudes) == 2 * 3  # one per adapted module
    prompts = [tokenizer("cat dog sun =").input_ids, tokenizer("red key map =").input_ids]
    expected = peft_greedy(model_dir("llama"), result.output, prompts, 6)
    engine = start_engine(model_dir("llama"), adapters_dir=str(result.output.parent))
    try:
        answers = [asyncio.run(collect(engine, prompt, SamplingParams(max_tokens=6, temperature=0), adapter="dora"))
                   for prompt in prompts]
    finally:
        engine.shutdown()
    assert [ids for ids, _, _ in answers] == expected


def test_packing_gives_the_loss_of_padded_batches(model_dir, tokenizer):
    model, _ = load_model(model_dir("llama"), "none", torch.float32, torch.device("cpu"))
    model.config.use_cache = False  # as in training: transformers reads packing from position ids only without a cache
    encoder = RowEncoder(tokenizer, frozenset({tokenizer.eos_token_id}))
    rows = [{"prompt": "one two", "completion": " three"}, {"prompt": "a", "completion": " b c d e f"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]
    features = list(ExampleDataset([encoder.encode(row, "x") for row in rows]))
    with torch.no_grad():
        padded = model(**PadCollator(tokenizer.pad_token_id)(features)).loss
        packed_batch = make_collator(tokenizer, packing=True)(features)
        assert packed_batch["input_ids"].shape[0] == 1
        packed = model(**packed_batch).loss
    torch.testing.assert_close(packed, padded)


def test_the_cli_reads_yaml_and_flags_win(tmp_path):
    (tmp_path / "options.yaml").write_text("data: rows.jsonl\noutput: out\nrank: 4\nlr: 0.001\ntargets: q_proj,v_proj\n")
    args = apply_config_file(build_parser(), ["train", "--config", str(tmp_path / "options.yaml"), "--rank", "8"])
    parsed = train_config(args)
    assert (parsed.rank, parsed.lr, parsed.targets, str(parsed.data)) == (8, 0.001, "q_proj,v_proj", "rows.jsonl")
    assert parsed.checkpoint_dir.name == "out.checkpoints"
    with pytest.raises(ValueError, match="--data is required"):
        train_config(build_parser().parse_args(["train", "--output", "x"]))
    with pytest.raises(ValueError, match="admin token"):
        train_config(build_parser().parse_args(["train", "--data", "d", "--output", "o", "--register", "http://h",
                                                "--admin-token", ""]))


def test_two_processes_with_torchrun_train_one_adapter(tmp_path, model_dir):
    """Distributed data parallel on two CPU processes (gloo), no code change: torchrun runs the same CLI."""
    write_rows(tmp_path / "train.jsonl", 32, seed=0)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "loradock", "train", "--model", str(model_dir("llama")), "--data",
               str(tmp_path / "train.jsonl"), "--output", str(tmp_path / "ddp"), "--max-steps", "2", "--batch-size", "4",
               "--lr", "1e-2", "--warmup", "0"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-20000:]
    assert finished.stdout.count("adapter written to") == 1  # only the first process writes
    report = json.loads((tmp_path / "ddp" / "training_report.json").read_text())
    assert report["environment"]["world_size"] == 2 and report["steps"] == 2
    assert report["eval_after"]["loss"] < report["eval_before"]["loss"]
