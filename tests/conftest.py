"""Shared fixtures: tiny local models of each architecture (random weights, in-process tokenizer), no hub."""

from __future__ import annotations

from pathlib import Path

import pytest
from lora_workload import mixed_workload, write_adapters

from loradock.serve.models.tiny_random import build_tokenizer, write_random_model


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache dir: the demo model is built under the test session's tmp dir."""
    monkeypatch.setenv("LORADOCK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "loradock-cache"))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """model_dir(arch) -> a tiny local HF model directory of that architecture, written once per session."""
    built: dict[str, Path] = {}

    def get(architecture: str = "llama") -> Path:
        if architecture not in built:
            path = tmp_path_factory.mktemp(f"tiny-{architecture}")
            built[architecture] = write_random_model(path / "model", architecture, tokenizer=tokenizer, seed=0)
        return built[architecture]

    return get


@pytest.fixture(scope="session")
def adapter_dir(model_dir, tmp_path_factory):
    """The three adapters of lora_workload.ADAPTERS for the tiny llama, written once per session."""
    return write_adapters(model_dir("llama"), tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="session")
def workload(tokenizer):
    return mixed_workload(tokenizer)
