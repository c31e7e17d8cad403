"""The adapter registry survives a restart (`--adapter-registry FILE`): a server's first life hot-loads an adapter
from outside its directory, reloads it and unloads a directory adapter; a second server on the same file serves what
the first left. Two server starts for the module (about 5 s), plus one engine for the corrupt-file check."""

from __future__ import annotations

import json

import pytest

from http_client import call
from loradock.adapters.peft_format import AdapterError
from server_support import ServerThread
from support import varied_prompts


def complete(server, model: str, prompt) -> object:
    return call(server.url, "POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8,
                                                        "temperature": 0})


@pytest.fixture(scope="module")
def lives(model_dir, adapter_dir, tmp_path_factory, tokenizer):
    """(the second server, the registry file, the hot adapter's output in the first life)."""
    registry = tmp_path_factory.mktemp("registry") / "registry.json"
    hot = tmp_path_factory.mktemp("outside") / "hot"
    hot.symlink_to(adapter_dir / "mlp-patterns", target_is_directory=True)
    prompt = varied_prompts(tokenizer, 1, seed=6)[0]

    def server():
        return ServerThread(model_dir("llama"), adapters_dir=adapter_dir, allow_adapter_paths=True,
                            adapter_registry=str(registry))

    with server() as first:
        admin = first.admin_headers
        assert call(first.url, "POST", "/v1/adapters", {"name": "hot", "path": str(hot)}, headers=admin).status == 201
        assert call(first.url, "POST", "/v1/adapters/hot/reload", headers=admin).status == 200
        assert call(first.url, "DELETE", "/v1/adapters/qv-r8", headers=admin).status == 200
        before = complete(first, "hot", prompt).json()["choices"][0]["text"]
    with server() as second:
        yield second, registry, prompt, before


def test_an_adapter_hot_loaded_before_a_restart_is_served_after_it(lives):
    second, _, prompt, before = lives
    reply = complete(second, "hot", prompt)
    assert reply.status == 200 and reply.json()["choices"][0]["text"] == before
    listed = call(second.url, "GET", "/v1/adapters", headers=second.admin_headers).json()["data"]
    listed = {adapter["name"]: adapter for adapter in listed}
    assert listed["hot"]["version"] == 2


def test_a_directory_adapter_unloaded_before_a_restart_stays_unloaded(lives):
    second, _, prompt, _ = lives
    assert complete(second, "qv-r8", prompt).status == 404
    assert complete(second, "all-r16-rslora", prompt).status == 200


def test_the_file_holds_names_sources_and_versions(lives):
    _, registry, _, _ = lives
    saved = json.loads(registry.read_text())
    assert saved["adapters"] == {"hot": {"source": saved["adapters"]["hot"]["source"], "version": 2}}
    assert saved["adapters"]["hot"]["source"].endswith("mlp-patterns") and saved["unloaded"] == ["qv-r8"]


def test_a_corrupt_registry_file_stops_the_start_with_a_clear_error(model_dir, tmp_path):
    registry = tmp_path / "registry.json"
    registry.write_text("{not json")
    with pytest.raises(AdapterError, match=r"registry .* cannot be read.*fix or remove it"):
        with ServerThread(model_dir("llama"), adapter_registry=str(registry)):
            pass
