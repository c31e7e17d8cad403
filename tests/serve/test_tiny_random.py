"""The locally built tokenizer, the tiny random models and the cached demo model (all offline)."""

from __future__ import annotations

import errno
import json
import logging
import os
import unicodedata

import jinja2
import platformdirs
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loradock.serve.models import tiny_random
from loradock.serve.models.tiny_random import (
    DEMO_MODEL_VERSION,
    build_tokenizer,
    demo_model_path,
    write_random_model,
)

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma"]

UNICODE_TEXTS = [
    "",
    "plain ascii, with punctuation!?",
    "  leading and trailing spaces  \n\n\ttabs\r\nand CRLF ",
    "héllo wörld — naïve café, Ελληνικά, русский, עברית, العربية",
    "中文字符，日本語のテキスト、한국어 텍스트",
    "emoji 🤖🚀👩‍👩‍👧‍👦 and flags 🇳🇱, combining e\u0301 and zero-width\u200bspace",
    "math ∀x∈ℝ: x² ≥ 0; control \x00\x07\x1b chars",
    "markers inside text: <s> </s> <|user|> <|end|>",
]


# The `tokenizer` fixture (build_tokenizer(), once per session) comes from conftest.py.


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Each test gets its own demo-model cache, never the real one."""
    monkeypatch.setenv("LORADOCK_CACHE_DIR", str(tmp_path / "cache"))


def _vocab_and_merges(tokenizer):
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return model["vocab"], model["merges"]


def test_tokenizer_training_is_deterministic(tokenizer):
    # Bypass the per-process cache: train again from scratch.
    retrained = json.loads(tiny_random._trained_tokenizer_json.__wrapped__(2048))["model"]
    vocab, merges = _vocab_and_merges(tokenizer)
    assert retrained["vocab"] == vocab
    assert retrained["merges"] == merges
    assert _vocab_and_merges(build_tokenizer()) == (vocab, merges)


def test_tokenizer_size_and_special_tokens(tokenizer):
    assert len(tokenizer) == 2048
    assert len(build_tokenizer(512)) == 512
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    expected_ids = {
        "<pad>": 0, "<s>": 1, "</s>": 2,
        "<|system|>": 3, "<|user|>": 4, "<|assistant|>": 5, "<|end|>": 6,
    }
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in expected_ids} == expected_ids
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert set(expected_ids) <= set(tokenizer.all_special_tokens)
    assert tokenizer.model_max_length == 2048


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_tokenizer_round_trips_unicode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == "<s>" + text


def test_tokenizer_adds_bos_only(tokenizer):
    ids = tokenizer("def f(x):\n    return x")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in ids
    assert ids[1:] == tokenizer("def f(x):\n    return x", add_special_tokens=False)["input_ids"]
    # Real text compresses: the merges were learned.
    assert len(ids) < len("def f(x):\n    return x")


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again?"},
    ]
    conversation = (
        "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n"
        "<|assistant|>\nHello!<|end|>\n<|user|>\nAgain?<|end|>\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == conversation
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == conversation + "<|assistant|>\n"

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    end, assistant = tokenizer.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])
    assert ids.count(end) == 4 and ids.count(assistant) == 2
    assert tokenizer.decode(ids) == prompt

    with pytest.raises(jinja2.TemplateError, match="Unsupported chat role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_write_random_model_loads_and_generates(tmp_path, tokenizer, architecture):
    path = write_random_model(tmp_path / architecture, architecture, tokenizer=tokenizer)
    assert path == tmp_path / architecture
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert [p.name for p in tmp_path.iterdir()] == [architecture]  # no staging debris

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    loaded = AutoTokenizer.from_pretrained(path, local_files_only=True)
    config = model.config
    assert config.model_type == architecture
    assert config.vocab_size == len(loaded) == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, [2, 6], 0)
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (64, 2, 16)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert next(model.parameters()).dtype == torch.float32
    if architecture == "mistral":
        assert config.sliding_window is None
    if architecture == "qwen2":
        assert config.use_sliding_window is False

    # The reloaded tokenizer encodes like the original. (transformers rebuilds a qwen2 model's
    # tokenizer as Qwen2Tokenizer, which NFC-normalizes, so only NFC text is compared.)
    for text in filter(lambda text: unicodedata.is_normalized("NFC", text), UNICODE_TEXTS):
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)

    prompt = "import os\nprint('hello')"
    input_ids = loaded(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(
            input_ids, max_new_tokens=16, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
    new_tokens = output.sequences[0, input_ids.shape[1]:].tolist()
    assert len(set(new_tokens)) > 1
    # Greedy picks are clear: no near-ties that rounding could flip.
    top2 = torch.stack(output.logits)[:, 0].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3


def test_write_random_model_is_seeded(tmp_path, tokenizer):
    def weights(name, seed):
        path = write_random_model(tmp_path / name, tokenizer=tokenizer, seed=seed)
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).state_dict()

    first, again, other = weights("a", 0), weights("b", 0), weights("c", 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.layers.0.self_attn.q_proj.weight"],
                           other["model.layers.0.self_attn.q_proj.weight"])


def test_write_random_model_overrides_and_errors(tmp_path, tokenizer):
    path = write_random_model(
        tmp_path / "small", "qwen3", tokenizer=tokenizer,
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=2112,
    )
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (32, 1, 16)
    assert config["vocab_size"] == 2112  # padded beyond the tokenizer, as real models often are

    with pytest.raises(ValueError, match="architecture"):
        write_random_model(tmp_path / "x", "gpt2", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="vocab_size"):
        write_random_model(tmp_path / "x", tokenizer=tokenizer, vocab_size=100)
    with pytest.raises(FileExistsError):
        write_random_model(path, tokenizer=tokenizer)


def test_write_random_model_keeps_the_winner_of_a_race(tmp_path, tokenizer, monkeypatch):
    target = tmp_path / "model"
    real_rename = os.rename

    def lose_the_race(source, destination):
        # Another process finishes first, just before this one renames its build into place.
        target.mkdir()
        (target / "theirs").write_text("x")
        real_rename(source, destination)

    monkeypatch.setattr(tiny_random.os, "rename", lose_the_race)
    assert write_random_model(target, tokenizer=tokenizer) == target
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # our staging folder is gone

    def fail(source, destination):
        raise OSError(errno.EACCES, "denied")

    monkeypatch.setattr(tiny_random.os, "rename", fail)
    with pytest.raises(PermissionError):
        write_random_model(tmp_path / "other", tokenizer=tokenizer)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_demo_model_path_builds_once_and_matches_the_spec(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="loradock.tiny_random"):
        path = demo_model_path()
    assert path == tmp_path / "cache" / f"demo-model-v{DEMO_MODEL_VERSION}"
    assert "building" in caplog.text and str(path) in caplog.text

    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loradock.tiny_random"):
        assert demo_model_path() == path
    assert caplog.text == ""
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps

    config = json.loads((path / "config.json").read_text())
    expected = {
        "model_type": "llama",
        "num_hidden_layers": 4,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 688,
        "vocab_size": 2048,
        "max_position_embeddings": 2048,
        "dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    assert {key: config[key] for key in expected} == expected

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    loaded = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert len(loaded) == 2048 and loaded.model_max_length == 2048
    input_ids = loaded.apply_chat_template(
        [{"role": "user", "content": "Hello?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=8, do_sample=False)
    assert len(set(output[0, input_ids.shape[1]:].tolist())) > 1


def test_demo_model_path_locations(tmp_path, monkeypatch):
    explicit = demo_model_path(tmp_path / "explicit")
    assert explicit == tmp_path / "explicit" / f"demo-model-v{DEMO_MODEL_VERSION}"
    assert not (tmp_path / "cache").exists()

    monkeypatch.delenv("LORADOCK_CACHE_DIR")
    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda app: str(tmp_path / app))
    assert demo_model_path() == tmp_path / "loradock" / f"demo-model-v{DEMO_MODEL_VERSION}"
    assert (demo_model_path() / "config.json").is_file()
