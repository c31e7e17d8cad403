"""Tenants over real HTTP on 127.0.0.1: keys stored hashed, each key sees and uses only its models (others' are
the same 404 as unknown ones), limits answer 429 with Retry-After, per-tenant metrics, the tenant's name and
weight reach the fair scheduler, and SIGHUP reloads the file without dropping a request in flight.

One in-process server (tiny llama, three adapters, four tenants) serves the module (a few seconds) and the load
generator's tenant streams and hang-ups; the SIGHUP test starts `loradock serve` in a subprocess (about 15 s); the
rest are unit tests of the file and the limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading

import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from http_client import OpenStream, call
from loradock.loadtest import loadtest as lt
from loradock.loadtest.random_adapters import write_random_adapter
from loradock.serve.api.rate_limits import RateLimited, RateLimits
from loradock.serve.api.server import build_state
from loradock.serve.api.state import ServerSettings
from loradock.serve.api.tenants import Tenants, TenantsError, hash_key
from loradock.serve.api.tenants import main as tenants_main
from loradock.cli import main as cli_main
from loradock.serve.engine import EngineConfig
from server_support import ADMIN_TOKEN, MODEL_NAME, ServerThread, free_port
from support import wait_until

PROMPT = [1, 40, 41, 42, 43, 44]  # six token ids
KEYS = {name: f"{name}-secret" for name in ("acme", "globex", "metered", "thrifty", "counted")}
TENANTS = {
    "acme": {"adapters": ["acme-*"], "base_model": True, "weight": 2},
    "globex": {"adapters": ["globex-sum"]},
    "metered": {"adapters": ["acme-chat"], "requests_per_minute": 2},
    "thrifty": {"base_model": True, "tokens_per_minute": 40},
    "counted": {"adapters": ["globex-sum"], "requests_per_minute": 1},  # the metrics test's own
}


def tenants_yaml(tenants: dict, keys: dict) -> str:
    return yaml.safe_dump({"tenants": {name: {"keys": [hash_key(keys[name])], **entry}
                                       for name, entry in tenants.items()}})


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    adapters = root / "adapters"
    for seed, name in enumerate(("acme-chat", "acme-sql", "globex-sum"), start=1):
        write_random_adapter(model_dir("llama"), adapters / name, seed=seed, r=4, target_modules=["q_proj", "v_proj"])
    tenants_file = root / "tenants.yaml"
    tenants_file.write_text(tenants_yaml(TENANTS, KEYS))
    with ServerThread(model_dir("llama"), adapters_dir=adapters, tenants_file=tenants_file, max_gpu_adapters=2,
                      kv_cache_memory="8MiB") as running:
        yield running


def key(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def client(server, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[tenant], max_retries=0)


def complete(server, tenant: str, model: str, **fields):
    return call(server.url, "POST", "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 2, **fields},
                key(tenant))


def scrape(server) -> dict:
    reply = call(server.url, "GET", "/metrics")
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(reply.body.decode()) for s in f.samples}


# ---- the file ---------------------------------------------------------------------------------------------------


def test_keys_are_stored_hashed_and_found_by_their_hash(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("acme-secret\n"))
    assert tenants_main(["hash-key"]) == 0
    assert capsys.readouterr().out == hash_key("acme-secret") + "\n"
    assert hash_key("acme-secret") == "sha256:" + hashlib.sha256(b"acme-secret").hexdigest()
    path = tmp_path / "tenants.yaml"
    path.write_text(tenants_yaml(TENANTS, KEYS))
    assert KEYS["acme"] not in path.read_text()
    tenants = Tenants.load(path)
    assert tenants.identify("acme-secret").name == "acme"
    assert tenants.identify("globex-secret").name == "globex"
    for wrong in ("", "ACME-SECRET", "acme-secret ", hash_key("acme-secret")):
        assert tenants.identify(wrong) is None
    path.write_text(yaml.safe_dump({"tenants": {"plain": {"keys": ["acme-secret"]}}}))
    with pytest.raises(TenantsError, match=r"tenants\.plain\.keys.*stored hashed.*hash-key"):
        Tenants.load(path)


@pytest.mark.parametrize("content, words", [
    ({"tenants": {"a": {"keys": [hash_key("k")]}, "b": {"keys": [hash_key("k")]}}}, "also belongs to 'a'"),
    ({"tenants": {"a": {"keys": [hash_key("k")], "weight": 0}}}, "tenants.a.weight"),
    ({"tenants": {"a": {"keys": [hash_key("k")], "rate": 5}}}, "tenants.a.rate: Extra inputs"),
    ({"tenants": {"a b": {"keys": [hash_key("k")]}}}, "tenant name 'a b'"),
    ({"tenants": {}}, "tenants"),
    ([1, 2], "the file"),
])
def test_a_bad_tenants_file_is_refused_naming_the_problem(tmp_path, content, words):
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(TenantsError) as error:
        Tenants.load(path)
    assert str(path) in str(error.value) and words in str(error.value)


def test_a_bad_tenants_file_stops_the_server_before_the_model_loads(tmp_path, capsys):
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants: [unclosed")
    settings = ServerSettings(served_model_name=MODEL_NAME, tenants_file=str(path))
    with pytest.raises(TenantsError, match=f"--tenants {path}"):
        build_state(EngineConfig(model=str(tmp_path / "no-model")), settings)
    assert cli_main(["serve", "--tenants", str(path), "--api-key", "k"]) == 2
    assert "exclude each other" in capsys.readouterr().err


# ---- scopes -----------------------------------------------------------------------------------------------------


def test_each_key_lists_only_its_models(server):
    assert [m.id for m in client(server, "acme").models.list()] == [MODEL_NAME, "acme-chat", "acme-sql"]
    assert [m.id for m in client(server, "globex").models.list()] == ["globex-sum"]
    assert [m.id for m in client(server, "thrifty").models.list()] == [MODEL_NAME]


def test_a_key_uses_its_models_and_gets_the_unknown_models_404_for_others(server):
    assert client(server, "acme").completions.create(model="acme-sql", prompt=PROMPT, max_tokens=2).usage
    assert client(server, "globex").completions.create(model="globex-sum", prompt=PROMPT, max_tokens=2).usage
    unknown = complete(server, "acme", "no-such-adapter")
    assert unknown.status == 404
    for tenant, model in (("acme", "globex-sum"), ("globex", "acme-chat"), ("globex", MODEL_NAME)):
        reply = complete(server, tenant, model)
        assert reply.status == 404
        assert reply.json() == json.loads(unknown.body.decode().replace("no-such-adapter", model))
    chat = call(server.url, "POST", "/v1/chat/completions",
                {"model": "globex-sum", "messages": [{"role": "user", "content": "hi"}]}, key("acme"))
    assert chat.status == 404 and chat.error["code"] == "model_not_found"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nobody"}, {"Authorization": f"Bearer {ADMIN_TOKEN}"},
                                     {"Authorization": KEYS["acme"]}])
def test_without_a_tenants_key_the_user_endpoints_answer_401(server, headers):
    for method, path, body in (("POST", "/v1/completions", {"model": MODEL_NAME, "prompt": PROMPT}),
                               ("GET", "/v1/models", None)):
        reply = call(server.url, method, path, body, headers)
        assert reply.status == 401 and reply.error["code"] == "invalid_token", reply.body


def test_the_admin_token_stays_separate(server):
    assert call(server.url, "GET", "/v1/adapters", headers=key("acme")).status == 401
    assert call(server.url, "GET", "/v1/adapters", headers=server.admin_headers).status == 200


# ---- limits -----------------------------------------------------------------------------------------------------


def test_over_the_requests_per_minute_429_with_retry_after(server):
    for _ in range(2):
        assert complete(server, "metered", "acme-chat").status == 200
    reply = complete(server, "metered", "acme-chat")
    assert reply.status == 429
    assert reply.error["code"] == "rate_limit_exceeded" and "2 requests per minute" in reply.error["message"]
    assert 1 <= int(reply.headers["retry-after"]) <= 30  # one request comes back every 30 s
    with pytest.raises(openai.RateLimitError):
        client(server, "metered").completions.create(model="acme-chat", prompt=PROMPT, max_tokens=2)


def test_over_the_tokens_per_minute_429_with_retry_after(server):
    # 6 prompt + 30 max_tokens = 36 of the 40 a minute: passes; the next 36 need 32 more, 48 s of refill.
    assert complete(server, "thrifty", MODEL_NAME, max_tokens=30, ignore_eos=True).status == 200
    reply = complete(server, "thrifty", MODEL_NAME, max_tokens=30, ignore_eos=True)
    assert reply.status == 429 and "40 tokens per minute" in reply.error["message"]
    assert 40 <= int(reply.headers["retry-after"]) <= 48


def test_buckets_refill_refund_run_into_debt_and_follow_the_file(tmp_path):
    now = [0.0]
    limits = RateLimits(clock=lambda: now[0])
    path = tmp_path / "tenants.yaml"
    path.write_text(tenants_yaml({"t": {"tokens_per_minute": 60, "requests_per_minute": 10}}, {"t": "k"}))
    tenants = Tenants.load(path)
    limits.configure(tenants)
    t = tenants.by_name["t"]
    limits.admit(t, 50)  # 10 left
    with pytest.raises(RateLimited) as refused:
        limits.admit(t, 20)
    assert refused.value.reason == "tokens_per_minute" and refused.value.retry_after == pytest.approx(10.0)
    limits.refund(t, 15)  # the request generated 15 fewer tokens than max_tokens: 25 left
    limits.admit(t, 20)  # 5 left; a request counted nothing when refused
    now[0] = 55.0  # +55 tokens, capped at the minute's 60
    limits.admit(t, 500)  # more than a minute's worth passes on a full bucket, leaving a debt of 440
    with pytest.raises(RateLimited) as refused:
        limits.admit(t, 1)
    assert refused.value.retry_after == pytest.approx(441.0)
    path.write_text(tenants_yaml({"t": {"tokens_per_minute": 60, "requests_per_minute": 1}}, {"t": "k"}))
    limits.configure(Tenants.load(path))  # the request bucket shrinks to 1 and keeps what it held (7 -> 1)
    now[0] = 496.0  # the debt is paid
    limits.admit(t, 1)
    with pytest.raises(RateLimited) as refused:
        limits.admit(t, 1)
    assert refused.value.reason == "requests_per_minute"


# ---- metrics and fair share -------------------------------------------------------------------------------------


def test_per_tenant_metrics_count_requests_tokens_and_rejections(server):
    before = scrape(server)
    assert complete(server, "counted", "globex-sum", max_tokens=3, ignore_eos=True).status == 200
    assert complete(server, "counted", "acme-sql").status == 404
    assert complete(server, "counted", "globex-sum").status == 429  # one request a minute
    after = scrape(server)

    def moved(name, **labels):
        sample = (name, frozenset(labels.items()))
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    assert moved("loradock_tenant_requests_total", tenant="counted", status="length") == 1
    assert moved("loradock_tenant_prompt_tokens_total", tenant="counted") == len(PROMPT)
    assert moved("loradock_tenant_generation_tokens_total", tenant="counted") == 3
    assert moved("loradock_tenant_rejections_total", tenant="counted", reason="model_not_found") == 1
    assert moved("loradock_tenant_rejections_total", tenant="counted", reason="requests_per_minute") == 1
    assert moved("loradock_requests_total", model="globex-sum", status="length") == 1  # per adapter still


def test_the_tenants_name_and_weight_count_in_the_fair_scheduler(server):
    counters = server.engine.scheduler.policy.counters
    assert complete(server, "acme", "acme-chat", max_tokens=4, ignore_eos=True).status == 200
    before = counters["acme"]
    assert complete(server, "acme", "acme-sql", max_tokens=4, ignore_eos=True).status == 200
    assert counters["acme"] - before == (len(PROMPT) + 2 * 4) / 2  # prompt + 2 x output, over the weight 2


# ---- the load generator --------------------------------------------------------------------------------------------


def test_loadtest_sends_each_tenants_stream_with_its_key(server):
    tenants = [lt.parse_tenant("name=acme,key=acme-secret,concurrency=2,models=acme-chat"),
               lt.parse_tenant("name=globex,key=globex-secret,concurrency=1,output_len=3:3,models=globex-sum+acme-chat")]
    spec = lt.LoadSpec(url=server.url, models=[], requests=6, prompt_len=(4, 8), ordinary_ids=list(range(40, 90)),
                       output_len=(2, 6), tenants=tenants)
    result = asyncio.run(lt.run_load(spec))
    report = result.report()
    acme, globex = report["per_tenant"]["acme"], report["per_tenant"]["globex"]
    asked = [r.max_tokens for r in result.records if r.tenant == "acme"]
    assert len(set(asked)) > 1 and all(2 <= n <= 6 for n in asked) and report["short_outputs"] == 0
    assert acme["requests"] == acme["ok"] == 6 and acme["output_tokens"] == sum(asked)
    assert acme["service"] == acme["prompt_tokens"] + 2 * sum(asked)
    refused = sum(r.model == "acme-chat" for r in result.records if r.tenant == "globex")
    assert 0 < refused < 6 and globex["errors_by_status"] == {"404": refused} and globex["ok"] == 6 - refused
    assert {r.max_tokens for r in result.records if r.tenant == "globex"} == {3}  # its own answer lengths
    assert "tenant acme: 6/6 ok" in lt.format_report(report)


def test_a_client_that_hangs_up_is_recorded_and_its_request_cancelled(server):
    spec = lt.LoadSpec(url=server.url, models=["acme-chat"], concurrency=3, requests=3, prompt_len=(4, 4),
                       ordinary_ids=list(range(40, 90)), api_key=KEYS["acme"],
                       options=lt.RequestOptions(max_tokens=400, hang_up_after=2))
    cancelled = ("loradock_tenant_requests_total", frozenset({"tenant": "acme", "status": "cancelled"}.items()))
    before = scrape(server).get(cancelled, 0.0)
    records = asyncio.run(lt.run_load(spec)).records
    assert [r.status for r in records] == ["hung_up"] * 3 and all(r.output_tokens >= 2 for r in records)
    engine = server.engine
    assert wait_until(lambda: server.state.in_flight == 0 and engine.cache.usage == 0 and not engine.scheduler.running)
    assert all(v.pins == 0 for v in engine.adapters.registered())
    assert scrape(server)[cancelled] - before == 3


# ---- SIGHUP -----------------------------------------------------------------------------------------------------


class Lines:
    """A process's output, line by line, read on a thread so a test can wait for a line with a timeout."""

    def __init__(self, stream):
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in stream], daemon=True).start()

    def wait_for(self, text: str, timeout: float = 120) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            if text in line:
                return line


def test_sighup_reloads_the_tenants_without_dropping_requests(model_dir, tmp_path):
    path = tmp_path / "tenants.yaml"
    keys = {"old": "old-secret", "new": "new-secret"}
    path.write_text(tenants_yaml({"old": {"base_model": True}}, keys))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "loradock", "serve", "--model", str(model_dir("llama")), "--port", str(port),
         "--served-model-name", MODEL_NAME, "--max-gpu-adapters", "0", "--tenants", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ,
    )
    try:
        output = Lines(process.stdout)
        output.wait_for("loradock: serving")
        url = f"http://127.0.0.1:{port}"
        body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}
        with OpenStream(url, "/v1/completions", body, {"Authorization": "Bearer old-secret"}) as held:
            assert held.status == 200 and held.next_event()["choices"][0]["text"] is not None
            path.write_text(tenants_yaml({"new": {"base_model": True}}, keys))
            process.send_signal(signal.SIGHUP)
            output.wait_for("tenants reloaded")
            for secret, status in (("old-secret", 401), ("new-secret", 200)):
                reply = call(url, "POST", "/v1/completions", {**body, "max_tokens": 2},
                             {"Authorization": f"Bearer {secret}"})
                assert reply.status == status, reply.body
            path.write_text("tenants: {new: {keys: [not-hashed]}}")  # a broken file keeps the tenants in place
            process.send_signal(signal.SIGHUP)
            output.wait_for("tenants not reloaded")
            assert call(url, "GET", "/v1/models", headers={"Authorization": "Bearer new-secret"}).status == 200
            events = []
            while (event := held.next_event()) != "[DONE]":
                events.append(event)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for e in events if e["choices"][0]["text"]) >= 1
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
