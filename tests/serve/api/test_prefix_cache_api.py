"""Prefix caching over real HTTP on 127.0.0.1: `usage.prompt_tokens_details.cached_tokens` as the official `openai`
client reads it (completions, chat, streamed usage), tenants that share nothing, `cache_salt` separating one
tenant's requests, and the Prometheus counters and gauges, down to an idle server holding no block.

One server (tiny llama, base model only, blocks of 8 tokens, two tenants) serves the module; requests run one at a
time, so every count is exact.
"""

from __future__ import annotations

import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from http_client import call
from loradock.serve.api.tenants import hash_key
from server_support import MODEL_NAME, ServerThread
from support import wait_until

KEYS = {"alpha": "alpha-secret", "beta": "beta-secret"}
PROMPT = [1] + list(range(300, 319))  # 20 token ids: two full blocks before the block of the last token
WHOLE = 16  # the prompt tokens found when the same prompt was computed before
SYSTEM = ("You answer questions about the weather in the mountains, briefly and politely, and you never make up a "
          "forecast you do not have.")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    tenants_file = tmp_path_factory.mktemp("prefix") / "tenants.yaml"
    tenants_file.write_text(yaml.safe_dump({"tenants": {
        name: {"keys": [hash_key(key)], "base_model": True} for name, key in KEYS.items()}}))
    with ServerThread(model_dir("llama"), tenants_file=tenants_file, max_gpu_adapters=0, block_size=8,
                      kv_cache_memory="8MiB") as running:
        yield running


def client(server, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[tenant], max_retries=0)


def cached(server, tenant: str, prompt=PROMPT, **extra) -> int:
    """The prompt tokens a completion of `prompt` found cached."""
    reply = client(server, tenant).completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0,
                                                      extra_body=extra)
    return reply.usage.prompt_tokens_details.cached_tokens


def test_cached_tokens_in_completions_chat_and_streamed_usage(server):
    prompt = [1] + list(range(400, 419))
    assert cached(server, "alpha", prompt) == 0
    assert cached(server, "alpha", prompt) == WHOLE
    chat = client(server, "alpha").chat.completions
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Will it snow?"}]
    first = chat.create(model=MODEL_NAME, messages=messages, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages[1]["content"] = "Is the pass open today?"  # another question after the same system prompt
    stream = chat.create(model=MODEL_NAME, messages=messages, max_tokens=2, temperature=0, stream=True,
                         stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1
    shared = usage[0].prompt_tokens_details.cached_tokens
    assert 0 < shared < usage[0].prompt_tokens and shared % 8 == 0


def test_two_tenants_share_nothing_and_cache_salt_separates_one_tenants_requests(server):
    prompt = [1] + list(range(500, 519))
    assert cached(server, "alpha", prompt) == 0
    assert cached(server, "beta", prompt) == 0  # alpha's blocks are cached, but not for beta
    assert cached(server, "beta", prompt) == WHOLE
    assert cached(server, "alpha", prompt, cache_salt="mine") == 0
    assert cached(server, "alpha", prompt, cache_salt="mine") == WHOLE
    assert cached(server, "alpha", prompt, cache_salt="other") == 0
    assert cached(server, "beta", prompt, cache_salt="mine") == 0  # one salt, two tenants: still apart
    empty = call(server.url, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": prompt, "cache_salt": ""},
                 {"Authorization": f"Bearer {KEYS['alpha']}"})
    assert empty.status == 400 and "cache_salt" in empty.error["message"]


def scrape(server) -> dict[str, float]:
    text = call(server.url, "GET", "/metrics").body.decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_count_tokens_looked_up_and_found_and_an_idle_server_holds_no_block(server):
    prompt = [1] + list(range(600, 619))
    before = scrape(server)
    cached(server, "alpha", prompt)
    cached(server, "alpha", prompt)
    assert wait_until(lambda: server.state.in_flight == 0 and not server.engine.scheduler.running)
    after = scrape(server)
    assert after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"] == 2 * len(prompt)
    assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] == WHOLE
    assert sum(server.engine.cache.allocator.refs) == 0
    assert after["loradock_kv_cache_usage_ratio"] == 0
    assert after["loradock_kv_cache_cached_blocks"] == server.engine.cache.allocator.num_cached_free >= 2
