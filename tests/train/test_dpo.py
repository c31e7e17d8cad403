"""DPO adapters: pairs encoded exactly as the server renders prompts and ends replies, bad rows listed before the
model loads, held-out preference accuracy raised on the tiny model, and DPO on nf4 from an existing adapter."""

from __future__ import annotations

import json
import random

import pytest
import torch
from eval_support import write_jsonl
from safetensors.torch import load_file

from loradock.loadtest.random_adapters import write_random_adapter
from loradock.train.config import TrainConfig
from loradock.train.data import DataError, RowEncoder
from loradock.train.dpo import encode_pair
from loradock.train.trainer import train

END = "<|end|>"
WORDS = ["cat", "dog", "sun", "red", "map", "key"]
CHOSEN, REJECTED = "cat", "dog"  # the tiny base prefers " dog" after most of these prompts


def write_pairs(path, count: int, seed: int):
    """Half prompt rows, half chat rows, over random words: always prefer CHOSEN to REJECTED."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        words = " ".join(rng.choice(WORDS) for _ in range(3))
        if index % 2:
            rows.append({"prompt": words + " =", "chosen": " " + CHOSEN, "rejected": " " + REJECTED})
        else:
            rows.append({"messages": [{"role": "user", "content": words}], "chosen": CHOSEN, "rejected": REJECTED})
    write_jsonl(path, rows)
    return path


def dpo_config(tmp_path, model, name="dpo", **options) -> TrainConfig:
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        write_pairs(data, 48, seed=0)
    options = {"max_steps": 8, "eval_steps": 4, "batch_size": 8, "lr": 1e-2, "rank": 8, "alpha": 16, "dropout": 0.0,
               "warmup": 0, "val_split": 0.25, "quiet": True, **options}
    return TrainConfig(data=data, output=tmp_path / name, model=str(model), method="dpo", **options)


def test_pairs_are_encoded_as_the_server_renders_prompts_and_ends_replies(tokenizer):
    encoder = RowEncoder(tokenizer, frozenset({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)}))
    plain = encode_pair(encoder, {"prompt": "red key =", "chosen": " cat", "rejected": " dog sun"}, "x:1")
    assert plain.prompt_ids == tokenizer("red key =").input_ids  # as /v1/completions tokenizes a prompt
    assert plain.chosen_ids == tokenizer(" cat", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert plain.rejected_ids == tokenizer(" dog sun", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "red key"}]
    chat = encode_pair(encoder, {"messages": messages, "chosen": "cat", "rejected": "dog"}, "x:2")
    served = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert chat.prompt_ids == served  # as /v1/chat/completions renders the conversation
    assert chat.chosen_ids == tokenizer("cat" + END, add_special_tokens=False).input_ids  # the turn end it stops on


def test_bad_pairs_are_listed_with_file_and_line_before_the_model_loads(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [
        {"prompt": "p", "chosen": " a", "rejected": " b"},
        {"prompt": "p", "chosen": " a"},
        {"prompt": "p", "messages": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": " a", "rejected": " a"},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "chosen": "a",
         "rejected": "b"},
        {"messages": [], "chosen": "a", "rejected": "b"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        "not json",
    ])
    config = TrainConfig(data=path, output=tmp_path / "out", model=str(tmp_path / "no-model"), method="dpo")
    with pytest.raises(DataError) as caught:
        train(config)  # the model does not exist: the rows must be refused first
    message = str(caught.value)
    assert message.startswith(f"7 bad row(s) in {path}")
    for line, why in [(2, '"chosen" and "rejected" must be strings'), (3, '"prompt" or "messages" (one of them)'),
                      (4, "the same: nothing to prefer"), (5, "must end before the reply"),
                      (6, '"messages" must be a non-empty list'), (7, '"prompt" must be a non-empty string'),
                      (8, "not valid JSON")]:
        assert f"{path}:{line}: " in message and why in message
    assert f"{path}:1:" not in message


def test_dpo_raises_held_out_preference_accuracy(tmp_path, model_dir):
    result = train(dpo_config(tmp_path, model_dir("llama")))
    before, after = result.report["eval_before"], result.report["eval_after"]
    assert before["pairs"] == after["pairs"] == 12
    assert before["preference_accuracy"] < 0.5 and after["preference_accuracy"] == 1.0
    assert before["reward_margin"] == 0.0 and after["reward_accuracy"] == 1.0 and after["reward_margin"] > 0.5
    assert after["loss"] < before["loss"] == pytest.approx(0.6931, abs=1e-4)  # log 2: policy = reference
    assert result.report["losses"]["train"] and result.report["losses"]["eval"][0]["step"] == 0
    assert result.report["data"]["train"]["pairs"] == 36
    assert sorted(path.name for path in result.output.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "loss_curve.png", "training_report.json"]


def test_dpo_on_nf4_trains_on_from_an_existing_adapter(tmp_path, model_dir):
    start = write_random_adapter(model_dir("llama"), tmp_path / "sft", seed=3, std=0.05, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "v_proj"])
    result = train(dpo_config(tmp_path, model_dir("llama"), quantize="nf4", init_adapter=start, max_steps=4))
    report = result.report
    assert report["base_model"]["quantize"] == "nf4"
    lora = report["lora"]
    assert (lora["rank"], lora["alpha"], lora["target_modules"]) == (4, 8, ["q_proj", "v_proj"])  # the start's
    assert report["eval_after"]["loss"] < report["eval_before"]["loss"]
    written = load_file(result.output / "adapter_model.safetensors")
    initial = load_file(start / "adapter_model.safetensors")
    assert written.keys() == initial.keys()
    assert any(not torch.allclose(written[key].float(), initial[key].float()) for key in written)
    assert json.loads((result.output / "adapter_config.json").read_text())["r"] == 4
