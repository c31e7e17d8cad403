"""Bad input over real HTTP: every case answers the exact status, in OpenAI's error shape, with a message that
says what is wrong; none answers 500, and the server serves a normal request afterwards.

One server (tiny llama, adapters on, --max-queue 1, --max-lora-rank 8) serves the module; a second one, whose
tokenizer has no chat template and which requires an --api-key, serves the few cases that need those.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from http_client import OpenStream, call
from loradock.loadtest.random_adapters import write_random_adapter
from loradock.serve.models.loader import load_model
from peft_adapters import BAD_ADAPTERS, copy_adapter
from server_support import MODEL_NAME, ServerThread
from support import wait_until

MAX_LORA_RANK = 8
API_KEY = "user-key"


# ---- servers and adapters ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-errors")
    adapters, outside = root / "adapters", root / "outside"
    adapters.mkdir()
    outside.mkdir()
    return adapters, outside


@pytest.fixture(scope="module")
def bad_adapters(model_dir, tmp_path_factory):
    """case -> (a folder holding that bad adapter, the code it is refused with)."""
    base_model, _ = load_model(model_dir("llama"), "none", torch.float32, torch.device("cpu"))
    staging = tmp_path_factory.mktemp("bad-adapters")
    return {case: (build(base_model, staging / case), code) for case, (build, code) in BAD_ADAPTERS.items()}


@pytest.fixture(scope="module")
def server(model_dir, dirs):
    adapters, outside = dirs
    path = model_dir("llama")
    write_random_adapter(path, adapters / "good", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    write_random_adapter(path, outside / "stray", seed=2, r=4, target_modules=["q_proj"])
    os.symlink(outside / "stray", adapters / "linked-at-start")  # already there when the server scans the dir
    with ServerThread(path, adapters_dir=adapters, max_queue=1, max_lora_rank=MAX_LORA_RANK,
                      max_num_seqs=8, kv_cache_memory="16MiB") as running:
        yield running


@pytest.fixture(scope="module")
def keyed_server(model_dir, tmp_path_factory):
    """The tiny llama with its chat template stripped, behind --api-key."""
    path = shutil.copytree(model_dir("llama"), tmp_path_factory.mktemp("no-template") / "model")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with ServerThread(path, api_key=API_KEY, max_gpu_adapters=0, kv_cache_memory="4MiB") as running:
        assert not running.engine.tokenizer.chat_template
        yield running


def ask(server, method, path, body=None, headers=None, admin=False):
    reply = call(server.url, method, path, body, {**(server.admin_headers if admin else {}), **(headers or {})})
    assert reply.status < 500 or reply.error["code"] == "shutting_down", (reply.status, reply.body[:500])
    return reply


def refused(reply, status: int, code: str, *words: str, param: str | None = None) -> dict:
    """The reply is an OpenAI-shaped error with this status and code whose message names each of `words`."""
    assert reply.status == status, (reply.status, reply.body[:500])
    error = reply.error
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], (word, error["message"])
    if param is not None:
        assert error.get("param") == param, error
    return error


def complete(prompt="Hello", **fields) -> dict:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 3, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, **fields}


def serves(server, model: str = MODEL_NAME) -> None:
    """A normal request on `model` still answers 200 with tokens."""
    reply = ask(server, "POST", "/v1/completions", complete(model=model))
    assert reply.status == 200, reply.body[:500]
    assert reply.json()["usage"]["completion_tokens"] >= 1


# ---- malformed bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    "body, code, words",
    [
        (b'{"model": "tiny-base", "prompt": ', "invalid_json", ["not valid JSON"]),
        (b"\xff\xfe{}", "invalid_json", ["not valid JSON"]),
        (b"", "invalid_json", ["not valid JSON"]),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json", ["JSON", "deep"]),
        (b'[{"model": "tiny-base", "prompt": "Hi"}]', "invalid_request", ["body", "dictionary"]),
        (b"42", "invalid_request", ["body", "dictionary"]),
        (b'"text"', "invalid_request", ["body", "dictionary"]),
        (b"null", "invalid_request", ["body", "dictionary"]),
    ],
    ids=["truncated", "not_utf8", "empty", "too_deep", "array", "number", "string", "null"],
)
def test_a_body_that_is_not_a_json_object(server, endpoint, body, code, words):
    refused(ask(server, "POST", endpoint, body), 400, code, *words)


# ---- wrong types, out-of-range values, missing fields ----------------------------------------------------

COMPLETION_CASES = {
    "prompt_int": (dict(prompt=5), "prompt", ["prompt", "string", "list"]),
    "prompt_dict": (dict(prompt={"text": "Hi"}), "prompt", ["prompt"]),
    "max_tokens_string": (dict(max_tokens="5"), "max_tokens", ["max_tokens", "integer"]),
    "max_tokens_float": (dict(max_tokens=5.5), "max_tokens", ["max_tokens", "integer"]),
    "temperature_string": (dict(temperature="hot"), "temperature", ["temperature", "number"]),
    "stream_string": (dict(stream="yes"), "stream", ["stream", "boolean"]),
    "stop_20_strings": (dict(stop=[f"s{i}" for i in range(20)]), None, ["stop", "at most 8"]),
    "stop_empty_string": (dict(stop=[""]), None, ["stop", "non-empty"]),
    "stop_int": (dict(stop=7), "stop", ["stop"]),
    "max_tokens_0": (dict(max_tokens=0), "max_tokens", ["max_tokens", "greater than or equal to 1"]),
    "max_tokens_negative": (dict(max_tokens=-3), "max_tokens", ["max_tokens", "greater than or equal to 1"]),
    "temperature_negative": (dict(temperature=-1), "temperature", ["temperature", "greater than or equal to 0"]),
    "temperature_3": (dict(temperature=3), "temperature", ["temperature", "less than or equal to 2"]),
    "top_p_0": (dict(top_p=0), "top_p", ["top_p", "greater than 0"]),
    "top_p_1.5": (dict(top_p=1.5), "top_p", ["top_p", "less than or equal to 1"]),
    "top_k_-2": (dict(top_k=-2), "top_k", ["top_k"]),
    "logprobs_21": (dict(logprobs=21), "logprobs", ["logprobs", "less than or equal to 20"]),
    "n_2": (dict(n=2), "n", ["n", "less than or equal to 1"]),
    "seed_beyond_64_bits": (dict(seed=2**70, temperature=0.5), "seed", ["seed"]),
    "echo_not_a_bool": (dict(echo="yes"), "echo", ["echo"]),
    "stream_options_string": (dict(stream=True, stream_options="usage"), "stream_options", ["stream_options"]),
    "token_id_out_of_vocabulary": (dict(prompt=[1, 5, 99_999]), "prompt", ["token ids", "[0, 2048)"]),
    "token_id_negative": (dict(prompt=[1, -1]), "prompt", ["prompt", "greater than or equal to 0"]),
    "token_ids_empty": (dict(prompt=[]), "prompt", ["prompt"]),
    "stop_token_id_negative": (dict(stop_token_ids=[-5]), "stop_token_ids", ["stop_token_ids"]),
    "prompt_empty_string": (dict(prompt=""), "prompt", ["prompt", "empty"]),
}


@pytest.mark.parametrize("case", COMPLETION_CASES)
def test_a_bad_completion_field(server, case):
    fields, param, words = COMPLETION_CASES[case]
    refused(ask(server, "POST", "/v1/completions", complete(**fields)), 400, "invalid_request", *words, param=param)


EXTREME_BUT_VALID = {
    "temperature_1e-308": dict(temperature=1e-308),  # 0 in fp32: decoded greedily
    "top_p_1e-300": dict(top_p=1e-300),  # 0 in fp32: the most likely token still stays
    "top_k_beyond_vocabulary": dict(top_k=2**70, temperature=0.7),
    "seed_largest": dict(seed=2**64 - 1, temperature=0.7),
    "seed_smallest": dict(seed=-(2**63), temperature=0.7),
    "stop_token_id_beyond_vocabulary": dict(stop_token_ids=[2**70]),
    "logprobs_20": dict(logprobs=20),
}


@pytest.mark.parametrize("case", EXTREME_BUT_VALID)
def test_extreme_but_valid_values_are_served(server, case):
    fields = EXTREME_BUT_VALID[case]
    chat_fields = dict(logprobs=True, top_logprobs=20) if case == "logprobs_20" else fields
    for endpoint, body in (("/v1/completions", complete(**fields)), ("/v1/chat/completions", chat(**chat_fields))):
        for stream in (False, True):
            reply = ask(server, "POST", endpoint, {**body, "stream": stream})
            assert reply.status == 200, reply.body[:500]
            assert reply.body.rstrip().endswith(b"data: [DONE]") if stream else reply.json()["usage"]


@pytest.mark.parametrize("missing", ["model", "prompt"])
def test_a_missing_completion_field(server, missing):
    body = complete()
    del body[missing]
    refused(ask(server, "POST", "/v1/completions", body), 400, "invalid_request", missing, "Field required",
            param=missing)


CHAT_CASES = {
    "messages_string": (dict(messages="Hi"), "messages", ["messages", "list"]),
    "messages_empty": (dict(messages=[]), "messages", ["messages", "at least 1"]),
    "message_without_content": (dict(messages=[{"role": "user"}]), "messages", ["messages.0.content", "required"]),
    "message_bad_role": (dict(messages=[{"role": "robot", "content": "Hi"}]), "messages", ["messages.0.role"]),
    "content_not_string": (dict(messages=[{"role": "user", "content": 5}]), "messages", ["messages.0.content"]),
    "top_logprobs_21": (dict(logprobs=True, top_logprobs=21), "top_logprobs", ["top_logprobs"]),
    "logprobs_int": (dict(logprobs=3), "logprobs", ["logprobs", "boolean"]),
    "max_completion_tokens_0": (dict(max_completion_tokens=0), "max_completion_tokens", ["max_completion_tokens"]),
    "temperature_string": (dict(temperature="hot"), "temperature", ["temperature"]),
    "n_2": (dict(n=2), "n", ["n"]),
}


@pytest.mark.parametrize("case", CHAT_CASES)
def test_a_bad_chat_field(server, case):
    fields, param, words = CHAT_CASES[case]
    refused(ask(server, "POST", "/v1/chat/completions", chat(**fields)), 400, "invalid_request", *words, param=param)


@pytest.mark.parametrize("missing", ["model", "messages"])
def test_a_missing_chat_field(server, missing):
    body = chat()
    del body[missing]
    refused(ask(server, "POST", "/v1/chat/completions", body), 400, "invalid_request", missing, "Field required")


def test_a_role_the_chat_template_refuses(server):
    body = chat(messages=[{"role": "developer", "content": "42"}])  # tool turns become user turns in this template
    refused(ask(server, "POST", "/v1/chat/completions", body), 400, "invalid_messages", "chat template", "developer")


# ---- model and context --------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint, body", [("/v1/completions", complete(model="no-such-model")),
                                            ("/v1/chat/completions", chat(model="no-such-model"))])
def test_an_unknown_model(server, endpoint, body):
    refused(ask(server, "POST", endpoint, body), 404, "model_not_found", "'no-such-model'", "/v1/models")


def test_a_prompt_beyond_the_context(server):
    context = server.engine.max_model_len
    body = complete(prompt=[1] + [100] * context)
    refused(ask(server, "POST", "/v1/completions", body), 413, "context_length_exceeded",
            f"{context + 1} tokens", f"context is {context}", param="prompt")
    stream = complete(prompt=[1] + [100] * context, stream=True)  # refused before the stream starts
    refused(ask(server, "POST", "/v1/completions", stream), 413, "context_length_exceeded")


def test_prompt_plus_max_tokens_beyond_the_context(server):
    context = server.engine.max_model_len
    body = complete(prompt=[1, 100, 101], max_tokens=context)
    refused(ask(server, "POST", "/v1/completions", body), 400, "context_length_exceeded", "max_tokens",
            f"at most {context - 3}", param="max_tokens")
    body = chat(max_completion_tokens=context)
    refused(ask(server, "POST", "/v1/chat/completions", body), 400, "context_length_exceeded", "max_tokens")


def test_a_body_over_the_size_limit(server):
    body = json.dumps(complete(prompt="x" * (5 * 2**20))).encode()
    refused(ask(server, "POST", "/v1/completions", body), 413, "request_entity_too_large", "body size")


# ---- auth, queue, shutdown, routing -------------------------------------------------------------------------

ADMIN_CALLS = [
    ("GET", "/v1/adapters", None),
    ("POST", "/v1/adapters", {"name": "good"}),
    ("DELETE", "/v1/adapters/good", None),
    ("POST", "/v1/adapters/good/reload", None),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "good"}),
]


@pytest.mark.parametrize("method, path, body", ADMIN_CALLS)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "test-admin-token", "Basic dGVzdA=="])
def test_the_admin_api_needs_the_token(server, method, path, body, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    refused(ask(server, method, path, body, headers), 401, "invalid_token", "Authorization: Bearer")
    assert server.engine.adapters.get("good")  # nothing happened


def test_the_admin_api_is_off_without_a_token(server):
    server.state.settings.admin_token = None
    try:
        refused(ask(server, "GET", "/v1/adapters", admin=True), 401, "admin_disabled", "--admin-token")
    finally:
        server.state.settings.admin_token = "test-admin-token"
    assert ask(server, "GET", "/v1/adapters", admin=True).status == 200


@pytest.mark.parametrize("method, path, body", [("POST", "/v1/completions", complete()),
                                                ("POST", "/v1/chat/completions", chat()),
                                                ("GET", "/v1/models", None)])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key"])
def test_user_endpoints_need_the_api_key(keyed_server, method, path, body, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    refused(ask(keyed_server, method, path, body, headers), 401, "invalid_token", "Authorization: Bearer")


def test_with_the_api_key_requests_pass_and_health_needs_none(keyed_server):
    key = {"Authorization": f"Bearer {API_KEY}"}
    assert ask(keyed_server, "POST", "/v1/completions", complete(), key).status == 200
    assert ask(keyed_server, "GET", "/v1/models", None, key).status == 200
    assert ask(keyed_server, "GET", "/health").status == 200
    assert ask(keyed_server, "GET", "/metrics").status == 200


def test_chat_without_a_chat_template(keyed_server):
    key = {"Authorization": f"Bearer {API_KEY}"}
    refused(ask(keyed_server, "POST", "/v1/chat/completions", chat(), key), 400, "no_chat_template",
            "no chat template", "/v1/completions")


def test_a_full_queue(server):
    assert server.state.settings.max_queue == 1
    body = complete(prompt=[1, 100, 101], max_tokens=server.engine.max_model_len - 3, ignore_eos=True)
    with OpenStream(server.url, "/v1/completions", body) as held:
        assert held.status == 200
        assert held.next_event()["choices"][0]["text"] is not None  # it is running: one request in flight
        refused(ask(server, "POST", "/v1/completions", complete()), 429, "queue_full", "busy", "--max-queue")
        refused(ask(server, "POST", "/v1/chat/completions", chat()), 429, "queue_full")
    assert wait_until(lambda: server.state.in_flight == 0)
    serves(server)


def test_shutting_down(server):
    server.state.shutting_down = True
    try:
        refused(ask(server, "POST", "/v1/completions", complete()), 503, "shutting_down", "shutting down")
        refused(ask(server, "POST", "/v1/chat/completions", chat(stream=True)), 503, "shutting_down")
        health = call(server.url, "GET", "/health")
        assert health.status == 503 and health.json() == {"status": "shutting_down"}
    finally:
        server.state.shutting_down = False
    serves(server)


@pytest.mark.parametrize("path", ["/nope", "/v1/complete", "/v1/adapters/good/unknown-action", "/v1/models/x/y"])
def test_an_unknown_route(server, path):
    refused(ask(server, "GET", path, admin=True), 404, "not_found", path)


@pytest.mark.parametrize("method, path, allowed", [("GET", "/v1/completions", "POST"),
                                                   ("PUT", "/v1/chat/completions", "POST"),
                                                   ("DELETE", "/v1/models", "GET"),
                                                   ("POST", "/health", "GET"),
                                                   ("PATCH", "/v1/adapters", "GET")])
def test_a_wrong_method(server, method, path, allowed):
    reply = ask(server, method, path, admin=True)
    refused(reply, 405, "method_not_allowed", method, path, allowed)
    assert allowed in reply.headers["allow"]


# ---- adapters: each refusal of the checklist, loaded by the admin API and on first use ---------------------


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_a_refused_adapter(server, dirs, bad_adapters, case):
    folder, code = bad_adapters[case]
    name = f"bad-{case}"
    copy_adapter(folder, dirs[0] / name)  # dropped into the adapter directory while the server runs
    # the admin API reads and validates it at once, and registers nothing
    error = refused(ask(server, "POST", "/v1/adapters", {"name": name}, admin=True), 400, f"adapter_{code}", name)
    assert name not in {v.name for v in server.engine.adapters.registered()}
    # a request naming it registers it (load on first use), and its read is refused
    for stream in (False, True, False):  # the third request gets the cached refusal
        reply = ask(server, "POST", "/v1/completions", complete(model=name, stream=stream))
        assert refused(reply, 400, f"adapter_{code}", name)["message"] == error["message"]
    refused(ask(server, "POST", "/v1/chat/completions", chat(model=name)), 400, f"adapter_{code}")
    # reloading it is refused the same way; the server goes on serving the base model and a good adapter
    refused(ask(server, "POST", f"/v1/adapters/{name}/reload", admin=True), 400, f"adapter_{code}")
    serves(server)
    serves(server, "good")
    assert ask(server, "DELETE", f"/v1/adapters/{name}", admin=True).status == 200


def test_an_adapter_folder_without_a_config_is_no_model(server, dirs):
    (dirs[0] / "empty-folder").mkdir()
    refused(ask(server, "POST", "/v1/completions", complete(model="empty-folder")), 404, "model_not_found")
    refused(ask(server, "POST", "/v1/adapters", {"name": "empty-folder"}, admin=True), 400, "adapter_missing_file",
            "adapter_config.json")
    refused(ask(server, "POST", "/v1/adapters", {"name": "never-there"}, admin=True), 400, "adapter_missing_file",
            "never-there")


def test_loading_a_name_twice(server, dirs, model_dir):
    write_random_adapter(model_dir("llama"), dirs[0] / "twice", seed=3, r=4, target_modules=["q_proj"])
    assert ask(server, "POST", "/v1/adapters", {"name": "twice"}, admin=True).status == 201
    refused(ask(server, "POST", "/v1/adapters", {"name": "twice"}, admin=True), 409, "adapter_exists", "'twice'",
            "already registered", param="name")
    body = {"lora_name": "twice", "lora_path": str(dirs[0] / "twice")}
    refused(ask(server, "POST", "/v1/load_lora_adapter", body, admin=True), 409, "adapter_exists")
    serves(server, "twice")
    assert ask(server, "POST", "/v1/adapters/twice/reload", admin=True).status == 200  # replacing is reload's job


@pytest.mark.parametrize("method, path, body", [("DELETE", "/v1/adapters/ghost", None),
                                                ("POST", "/v1/adapters/ghost/reload", None),
                                                ("POST", "/v1/unload_lora_adapter", {"lora_name": "ghost"}),
                                                ("DELETE", "/v1/adapters/..%2Fgood", None),
                                                ("DELETE", "/v1/adapters/%2E%2E", None)])
def test_an_unknown_adapter_cannot_be_unloaded_or_reloaded(server, method, path, body):
    refused(ask(server, method, path, body, admin=True), 404, "adapter_not_found", "no adapter named")
    serves(server, "good")


@pytest.mark.parametrize("name", ["../good", "good/../good", "a/b", "a%2Fb", "a\\b", "..", ".", "/etc", "",
                                  "x" * 200, "bad\x00name", "caf\u00e9"])
def test_a_name_that_is_not_a_folder_name(server, name):
    refused(ask(server, "POST", "/v1/adapters", {"name": name}, admin=True), 400, "invalid_adapter_name",
            "invalid adapter name", param="name")
    refused(ask(server, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "x"}, admin=True), 400,
            "invalid_adapter_name")
    refused(ask(server, "POST", "/v1/completions", complete(model=name)), 404, "model_not_found")


def test_a_path_outside_the_adapter_directory(server, dirs):
    adapters, outside = dirs
    for path in (str(outside / "stray"), str(adapters / ".." / "outside" / "stray"), "/etc", "stray",
                 "~/somewhere", str(adapters), str(adapters / "linked-at-start")):
        refused(ask(server, "POST", "/v1/adapters", {"name": "stray", "path": path}, admin=True), 403,
                "path_not_allowed", "outside the adapter directory", "--allow-adapter-paths", param="path")
        body = {"lora_name": "stray", "lora_path": path}
        refused(ask(server, "POST", "/v1/load_lora_adapter", body, admin=True), 403, "path_not_allowed")
    for path in ("/tmp/bad\x00path", "/tmp/\ud800"):  # not a path the OS can take
        refused(ask(server, "POST", "/v1/adapters", {"name": "stray", "path": path}, admin=True), 400,
                "invalid_adapter_path", param="path")
    refused(ask(server, "POST", "/v1/completions", complete(model="stray")), 404, "model_not_found")
    # --allow-adapter-paths lets the same path in
    server.state.settings.allow_adapter_paths = True
    try:
        reply = ask(server, "POST", "/v1/adapters", {"name": "stray", "path": str(outside / "stray")}, admin=True)
        assert reply.status == 201, reply.body
    finally:
        server.state.settings.allow_adapter_paths = False
    serves(server, "stray")
    assert ask(server, "DELETE", "/v1/adapters/stray", admin=True).status == 200


def test_a_symlink_out_of_the_adapter_directory(server, dirs):
    adapters, outside = dirs
    os.symlink(outside / "stray", adapters / "linked")  # dropped in while the server runs
    os.symlink(adapters / "looped", adapters / "looped")
    refused(ask(server, "POST", "/v1/adapters", {"name": "looped"}, admin=True), 400, "invalid_adapter_path",
            "'looped'")
    refused(ask(server, "POST", "/v1/completions", complete(model="looped")), 404, "model_not_found")
    refused(ask(server, "POST", "/v1/adapters", {"name": "linked"}, admin=True), 400, "invalid_adapter_path",
            "'linked'", "outside the adapter directory")
    refused(ask(server, "POST", "/v1/completions", complete(model="linked")), 404, "model_not_found")
    models = {m["id"] for m in ask(server, "GET", "/v1/models").json()["data"]}
    assert "good" in models and "linked" not in models


def test_a_symlink_out_of_the_adapter_directory_at_start(server):
    refused(ask(server, "POST", "/v1/completions", complete(model="linked-at-start")), 404, "model_not_found")


def test_the_server_still_serves_after_everything(server):
    serves(server)
    serves(server, "good")
    assert server.state.in_flight == 0
    assert not [v.name for v in server.engine.adapters.registered() if v.pins]
