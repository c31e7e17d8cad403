"""Loading a base model: local directories only, clear errors, the CLI end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from loradock.serve.models.loader import ModelLoadError, load_model
from loradock.serve.models.source import resolve_model_path


def test_a_hub_id_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="never downloads"):
        resolve_model_path("meta-llama/Llama-3.1-8B")


def test_a_directory_without_a_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_path(tmp_path)


@pytest.mark.parametrize("quantize, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt"), ("none", "Linear")])
def test_quantized_loading_replaces_the_linear_layers(model_dir, quantize, layer):
    model, tokenizer = load_model(model_dir("llama"), quantize, torch.float32, torch.device("cpu"))
    assert type(model.model.layers[0].mlp.down_proj).__name__ == layer
    with torch.inference_mode():
        logits = model(torch.tensor([tokenizer("hello").input_ids])).logits
    assert torch.isfinite(logits).all()


def test_cli_generate_runs_the_engine(model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "loradock", "generate", "--model", str(model_dir("qwen2")),
         "--prompt", "def main():", "--prompt", "hello", "--max-tokens", "5", "--ignore-eos"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- prompt:") == 2
    assert "2 requests, 10 tokens" in result.stdout


def test_cli_reports_a_missing_model_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "loradock", "generate", "--model", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "never downloads" in result.stderr and "Traceback" not in result.stderr
