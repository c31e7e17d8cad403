"""/metrics, parsed with prometheus_client's own parser, moves as requests run: request counts by model and
status, token counts, latency histograms, engine gauges, adapter tiers; and a client that disconnects mid-stream
is cancelled, leaving nothing running, no KV blocks and no adapter pins behind.

One server (tiny llama, one device adapter slot, two adapters in its directory) serves the module; the tests run
one request at a time, so every figure is exact.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from http_client import OpenStream, call
from loradock.loadtest.random_adapters import write_random_adapter
from server_support import MODEL_NAME, ServerThread
from support import wait_until

PROMPT = [1, 40, 41, 42, 43, 44]  # six token ids


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("metrics") / "adapters"
    adapters.mkdir()
    for seed, name in enumerate(("a1", "a2"), start=1):
        write_random_adapter(model_dir("llama"), adapters / name, seed=seed, r=4, target_modules=["q_proj", "v_proj"])
    with ServerThread(model_dir("llama"), adapters_dir=adapters, max_gpu_adapters=1, max_num_seqs=8,
                      kv_cache_memory="8MiB") as running:
        yield running


class Scrape:
    """One /metrics scrape: sample values by (sample name, labels)."""

    def __init__(self, server):
        reply = call(server.url, "GET", "/metrics")
        assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
        self.families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
        self.values = {(s.name, frozenset(s.labels.items())): s.value
                       for f in self.families.values() for s in f.samples}

    def __call__(self, name: str, **labels) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)


def completion(server, **fields) -> dict:
    reply = call(server.url, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": PROMPT, **fields})
    assert reply.status == 200, reply.body[:500]
    return reply.json()


def idle(server) -> bool:
    """Nothing in flight, nothing running or waiting in the engine, no KV block held."""
    engine = server.engine
    return (server.state.in_flight == 0 and not engine.scheduler.running and not engine.scheduler.waiting
            and engine.cache.usage == 0)


def test_the_families_and_their_types(server):
    completion(server, max_tokens=2)
    families = Scrape(server).families
    expected = {
        "loradock_requests": "counter", "loradock_prompt_tokens": "counter", "loradock_generation_tokens": "counter",
        "loradock_time_to_first_token_seconds": "histogram", "loradock_time_per_output_token_seconds": "histogram",
        "loradock_e2e_request_latency_seconds": "histogram", "loradock_batch_tokens": "histogram",
        "loradock_adapter_loads": "counter", "loradock_adapter_load_seconds": "histogram",
        "loradock_adapter_evictions": "counter", "loradock_adapter_cache_lookups": "counter",
        "loradock_queue_depth": "gauge", "loradock_running_requests": "gauge", "loradock_kv_cache_usage_ratio": "gauge",
        "loradock_kv_cache_blocks_total": "gauge", "loradock_preemptions": "gauge",
        "loradock_adapter_slots_used": "gauge", "loradock_adapter_slots_total": "gauge",
        "loradock_adapters_host_cached": "gauge",
    }
    for name, kind in expected.items():
        assert name in families, name
        assert families[name].type == kind, (name, families[name].type)
        assert families[name].documentation, name


def test_a_request_moves_the_request_token_and_latency_metrics(server):
    before = Scrape(server)
    body = completion(server, max_tokens=5, ignore_eos=True)
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    after = Scrape(server)
    model = {"model": MODEL_NAME}
    delta = lambda name, **labels: after(name, **labels) - before(name, **labels)  # noqa: E731
    assert delta("loradock_requests_total", model=MODEL_NAME, status="length") == 1
    assert delta("loradock_prompt_tokens_total", **model) == 6
    assert delta("loradock_generation_tokens_total", **model) == 5
    for histogram in ("loradock_time_to_first_token_seconds", "loradock_time_per_output_token_seconds",
                      "loradock_e2e_request_latency_seconds"):
        assert delta(f"{histogram}_count", **model) == 1, histogram
        assert delta(f"{histogram}_sum", **model) > 0, histogram
    assert after("loradock_time_to_first_token_seconds_sum", **model) <= after(
        "loradock_e2e_request_latency_seconds_sum", **model)
    # one step for the 6-token prefill (it samples the first token), then one step per further token
    assert delta("loradock_batch_tokens_count") == 5
    assert delta("loradock_batch_tokens_sum") == 6 + 4
    assert delta("loradock_batch_tokens_bucket", le="8.0") == 5  # every step had at most 8 tokens
    assert delta("loradock_batch_tokens_bucket", le="4.0") == 4
    assert after("loradock_running_requests") == 0 and after("loradock_queue_depth") == 0
    assert after("loradock_kv_cache_usage_ratio") == 0
    assert after("loradock_kv_cache_blocks_total") == server.engine.cache.num_blocks > 0


def test_statuses_stop_rejected_and_a_chat_request(server):
    first = completion(server, max_tokens=1, temperature=0, return_token_ids=True)["choices"][0]["token_ids"][0]
    before = Scrape(server)
    stopped = completion(server, max_tokens=8, temperature=0, stop_token_ids=[first])
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 1
    reply = call(server.url, "POST", "/v1/chat/completions",
                 {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                  "ignore_eos": True})
    assert reply.status == 200
    chat_usage = reply.json()["usage"]
    server.state.settings.max_queue = 0  # every request is one too many
    try:
        assert call(server.url, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "Hi"}).status == 429
    finally:
        server.state.settings.max_queue = 1024
    assert call(server.url, "POST", "/v1/completions", {"model": "no-such-model", "prompt": "Hi"}).status == 404
    after = Scrape(server)
    delta = lambda name, **labels: after(name, **labels) - before(name, **labels)  # noqa: E731
    assert delta("loradock_requests_total", model=MODEL_NAME, status="stop") == 1
    assert delta("loradock_requests_total", model=MODEL_NAME, status="length") == 1  # the chat request
    assert delta("loradock_requests_total", model=MODEL_NAME, status="rejected") == 1
    assert delta("loradock_requests_total", model="no-such-model", status="error") == 0  # refused at the edge
    assert delta("loradock_prompt_tokens_total", model=MODEL_NAME) == 6 + chat_usage["prompt_tokens"]
    assert delta("loradock_generation_tokens_total", model=MODEL_NAME) == 1 + 4
    assert delta("loradock_time_per_output_token_seconds_count", model=MODEL_NAME) == 1  # one token has no TPOT
    assert delta("loradock_e2e_request_latency_seconds_count", model=MODEL_NAME) == 2


def test_adapter_loads_lookups_slots_and_evictions(server):
    before = Scrape(server)
    assert before("loradock_adapter_slots_total") == 1 and before("loradock_adapter_slots_used") == 0

    def run(model: str) -> Scrape:
        body = completion(server, model=model, max_tokens=3, ignore_eos=True)
        assert body["model"] == model
        return Scrape(server)

    first = run("a1")  # read from disk into the host cache and the one device slot
    delta = lambda s, name, **labels: s(name, **labels) - before(name, **labels)  # noqa: E731
    assert delta(first, "loradock_adapter_loads_total") == 1
    assert delta(first, "loradock_adapter_load_seconds_count") == 1 and delta(first, "loradock_adapter_load_seconds_sum") > 0
    assert delta(first, "loradock_adapter_cache_lookups_total", tier="device", result="miss") == 1
    assert delta(first, "loradock_adapter_cache_lookups_total", tier="host", result="miss") == 1
    assert first("loradock_adapter_slots_used") == 1 and first("loradock_adapters_host_cached") == 1
    assert delta(first, "loradock_requests_total", model="a1", status="length") == 1
    assert delta(first, "loradock_prompt_tokens_total", model="a1") == 6
    assert delta(first, "loradock_generation_tokens_total", model="a1") == 3

    again = run("a1")  # on the device already
    assert delta(again, "loradock_adapter_cache_lookups_total", tier="device", result="hit") == 1
    assert delta(again, "loradock_adapter_loads_total") == 1

    other = run("a2")  # a second adapter takes the only slot: a1 is evicted from the device, kept on the host
    assert delta(other, "loradock_adapter_loads_total") == 2
    assert delta(other, "loradock_adapter_evictions_total", tier="device") == 1
    assert delta(other, "loradock_adapter_cache_lookups_total", tier="device", result="miss") == 2
    assert other("loradock_adapter_slots_used") == 1 and other("loradock_adapters_host_cached") == 2

    back = run("a1")  # back from the host cache: no disk read
    assert delta(back, "loradock_adapter_loads_total") == 2
    assert delta(back, "loradock_adapter_cache_lookups_total", tier="host", result="hit") == 1
    assert delta(back, "loradock_adapter_evictions_total", tier="device") == 2
    assert delta(back, "loradock_adapter_load_seconds_count") == 2
    assert delta(back, "loradock_adapter_evictions_total", tier="host") == 0


def test_the_gauges_while_a_request_runs(server):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": server.engine.max_model_len - len(PROMPT),
            "ignore_eos": True}
    with OpenStream(server.url, "/v1/completions", body) as stream:
        assert stream.status == 200
        stream.next_event()
        during = Scrape(server)
    assert during("loradock_running_requests") == 1 and during("loradock_queue_depth") == 0
    assert 0 < during("loradock_kv_cache_usage_ratio") <= 1
    assert wait_until(lambda: idle(server))


def test_vllms_lora_requests_info_names_the_running_adapter(server):
    """The gauge Kubernetes gateways route by (GIE's LoRA affinity, llm-d): labels as vLLM sets them."""
    body = {"model": "a1", "prompt": PROMPT, "max_tokens": server.engine.max_model_len - len(PROMPT), "ignore_eos": True}
    with OpenStream(server.url, "/v1/completions", body) as stream:
        assert stream.status == 200
        stream.next_event()
        (during,) = Scrape(server).families["vllm:lora_requests_info"].samples
    assert during.labels == {"max_lora": "1", "running_lora_adapters": "a1", "waiting_lora_adapters": ""}
    assert wait_until(lambda: idle(server))
    (after,) = Scrape(server).families["vllm:lora_requests_info"].samples
    assert after.labels["running_lora_adapters"] == "" and after.value >= during.value


@pytest.mark.parametrize("model", [MODEL_NAME, "a2"])
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_a_client_that_disconnects_mid_stream_is_cancelled(server, model, endpoint):
    before = Scrape(server)
    steps = server.engine.steps
    prompt = {"prompt": PROMPT} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    body = {"model": model, **prompt, "max_tokens": 1000, "ignore_eos": True}
    with OpenStream(server.url, endpoint, body) as stream:
        assert stream.status == 200
        for _ in range(3):
            assert isinstance(stream.next_event(), dict)
        assert server.state.in_flight == 1
        if model != MODEL_NAME:
            assert server.engine.adapters.get(model).pins == 1
    # the connection is gone: the server cancels the request
    assert wait_until(lambda: Scrape(server)("loradock_requests_total", model=model, status="cancelled")
                      == before("loradock_requests_total", model=model, status="cancelled") + 1)
    assert wait_until(lambda: idle(server))
    after = Scrape(server)
    assert after("loradock_running_requests") == 0 and after("loradock_queue_depth") == 0
    assert after("loradock_kv_cache_usage_ratio") == 0
    assert server.engine.steps - steps < 900  # it did not run to its max_tokens
    assert not server.engine._requests  # noqa: SLF001 - the engine forgot it
    assert all(v.pins == 0 for v in server.engine.adapters.registered())
    tokens = after("loradock_generation_tokens_total", model=model) - before("loradock_generation_tokens_total", model=model)
    assert 2 <= tokens < 1000
    assert after("loradock_requests_total", model=model, status="error") == before(
        "loradock_requests_total", model=model, status="error")
    completion(server, model=model, max_tokens=2)  # and the server goes on
