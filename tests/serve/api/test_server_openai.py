"""The server through the official `openai` client and real HTTP on 127.0.0.1: completions, chat, streaming,
the model list, hot-loading and unloading under load, reload, and a draining SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import openai
import pytest
import torch
from server_support import MODEL_NAME, ServerThread, free_port
from support import peft_greedy, varied_prompts

from loradock.loadtest.random_adapters import write_random_adapter

MAX_NEW = 8
NO_EOS = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    """The server's adapter directory with a and b; c is written aside, to be dropped in later."""
    root = tmp_path_factory.mktemp("served-adapters")
    spare = tmp_path_factory.mktemp("spare-adapters")
    base = model_dir("llama")
    write_random_adapter(base, root / "a", seed=1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    write_random_adapter(base, root / "b", seed=2, r=4, lora_alpha=8, target_modules="all-linear")
    write_random_adapter(base, spare / "c", seed=3, r=16, lora_alpha=16, target_modules=["o_proj", "down_proj"])
    write_random_adapter(base, spare / "b-v2", seed=4, r=4, lora_alpha=8, target_modules="all-linear")
    return root, spare


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return varied_prompts(tokenizer, 8, seed=21)


def reference(model_dir, adapter_dir, prompts, max_new=MAX_NEW):
    return peft_greedy(model_dir("llama"), adapter_dir, prompts, max_new, ignore_eos=True)


@pytest.fixture(scope="module")
def server(model_dir, adapters):
    root, _ = adapters
    with ServerThread(model_dir("llama"), adapters_dir=root, max_gpu_adapters=4) as running:
        yield running


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **kw)


def test_completions_equal_peft_through_the_openai_client(server, adapters, model_dir, prompts):
    root, _ = adapters
    api = client(server)
    for model, adapter_dir in ((MODEL_NAME, None), ("a", root / "a"), ("b", root / "b")):
        expected = reference(model_dir, adapter_dir, prompts[:2])
        for prompt, want in zip(prompts[:2], expected):
            done = api.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0,
                                          extra_body=NO_EOS)
            choice = done.choices[0]
            assert choice.model_extra["token_ids"] == want
            assert choice.finish_reason == "length"
            assert done.usage.prompt_tokens == len(prompt) and done.usage.completion_tokens == MAX_NEW
            assert choice.text == server.engine.tokenizer.decode(want, skip_special_tokens=True)


def test_streamed_completion_equals_the_whole_one(server, prompts):
    api = client(server)
    whole = api.completions.create(model="a", prompt=prompts[3], max_tokens=MAX_NEW, temperature=0, extra_body=NO_EOS)
    chunks = list(api.completions.create(model="a", prompt=prompts[3], max_tokens=MAX_NEW, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body=NO_EOS))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    assert text == whole.choices[0].text and ids == whole.choices[0].model_extra["token_ids"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_NEW


def test_chat_with_the_template_streamed_and_not(server):
    api = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    whole = api.chat.completions.create(model="b", messages=messages, max_tokens=6, temperature=0, extra_body=NO_EOS)
    template_ids = server.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert whole.usage.prompt_tokens == len(template_ids)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(api.chat.completions.create(model="b", messages=messages, max_tokens=6, temperature=0, stream=True,
                                              extra_body=NO_EOS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs_and_stop_strings(server, prompts):
    api = client(server)
    done = api.completions.create(model=MODEL_NAME, prompt=prompts[4], max_tokens=4, temperature=0, logprobs=3,
                                  extra_body=NO_EOS)
    logprobs = done.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 4 and all(lp <= 0 for lp in logprobs.token_logprobs)
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen)  # greedy picks the top one
    text = api.completions.create(model=MODEL_NAME, prompt=prompts[4], max_tokens=12, temperature=0,
                                  extra_body=NO_EOS).choices[0].text
    stop = text[len(text) // 2 :][:2]
    cut = api.completions.create(model=MODEL_NAME, prompt=prompts[4], max_tokens=12, temperature=0, stop=[stop],
                                 extra_body=NO_EOS).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_scores_the_prompt_as_the_model_does(server, adapters, model_dir, prompts, stream):
    from peft import PeftModel

    from loradock.serve.models.loader import load_model

    prompt = prompts[3]  # token ids: echoed exactly
    model, tokenizer = load_model(model_dir("llama"), "none", torch.float32, torch.device("cpu"))
    model = PeftModel.from_pretrained(model, adapters[0] / "b")
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), -1)  # [P-1, vocab]
    expected = expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
    api = client(server)
    options = dict(model="b", prompt=prompt, max_tokens=2, temperature=0, logprobs=2, echo=True, extra_body=NO_EOS)
    if stream:
        chunks = list(api.completions.create(stream=True, **options))
        text = "".join(c.choices[0].text for c in chunks)
        logprobs = chunks[0].choices[0].logprobs
    else:
        done = api.completions.create(**options).choices[0]
        text, logprobs = done.text, done.logprobs
    assert text.startswith(tokenizer.decode(prompt))
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1 : len(prompt)] == pytest.approx(expected, abs=1e-4)
    assert len(logprobs.tokens) == len(prompt) + (1 if stream else 2)  # streamed: the first token rides along


def test_model_list_has_the_base_and_every_adapter(server):
    ids = {m.id for m in client(server).models.list()}
    assert {MODEL_NAME, "a", "b"} <= ids


def test_hot_load_and_unload_while_32_streams_run(model_dir, adapters, prompts):
    root, spare = adapters
    long = 48
    expected = {
        MODEL_NAME: reference(model_dir, None, prompts, long),
        "a": reference(model_dir, root / "a", prompts, long),
        "b": reference(model_dir, root / "b", prompts, long),
        "c": reference(model_dir, spare / "c", prompts, long),
    }
    served = root.parent / "hot-served"
    shutil.copytree(root, served)
    plan = [(name, i % len(prompts)) for i, name in enumerate([MODEL_NAME, "a", "b"] * 10 + ["a", "b"])]

    async def scenario(server):
        api = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        started = asyncio.Semaphore(0)

        async def stream(model, p):
            ids, first = [], True
            chunks = await api.completions.create(model=model, prompt=prompts[p], max_tokens=long, temperature=0,
                                                  stream=True, extra_body=NO_EOS)
            async for chunk in chunks:
                ids.extend(chunk.choices[0].model_extra["token_ids"])
                if first:
                    first = False
                    started.release()
            return model, p, ids

        tasks = [asyncio.create_task(stream(m, p)) for m, p in plan]
        for _ in plan:
            await started.acquire()  # all 32 are streaming
        shutil.copytree(spare / "c", served / "c")  # dropped into the directory, then hot-loaded
        async with aiohttp.ClientSession(headers=server.admin_headers) as http:
            async with http.post(server.url + "/v1/adapters", json={"name": "c"}) as r:
                assert r.status == 201, await r.text()
            hot = [asyncio.create_task(stream("c", p)) for p in range(4)]
            b_version = server.engine.resolve_adapter("b")
            async with http.delete(server.url + "/v1/adapters/b") as r:
                assert r.status == 200
            in_flight_on_b = b_version.pins
            async with http.post(server.url + "/v1/completions", json={"model": "b", "prompt": "x"}) as r:
                assert r.status == 404
        results = await asyncio.gather(*tasks, *hot)
        return results, b_version, in_flight_on_b

    with ServerThread(model_dir("llama"), adapters_dir=served, max_gpu_adapters=4) as server:
        results, b_version, in_flight_on_b = asyncio.run(scenario(server))
        assert in_flight_on_b > 0  # b was unloaded with requests in flight ...
        for model, p, ids in results:
            assert ids == expected[model][p], f"{model} prompt {p}"  # ... and every stream finished right
        deadline = time.monotonic() + 10
        while b_version.slot is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b_version.slot is None and b_version.weights is None  # its memory is freed
        assert server.engine.cache.allocator.num_free == server.engine.cache.num_blocks
        ids = {m.id for m in openai.OpenAI(base_url=server.url + "/v1", api_key="x").models.list()}
        assert "c" in ids and "b" not in ids


def test_reload_changes_outputs_for_new_requests_only(model_dir, adapters, prompts):
    root, spare = adapters
    long = 40
    v1 = reference(model_dir, root / "b", prompts[:1], long)[0]
    v2 = reference(model_dir, spare / "b-v2", prompts[:1], long)[0]
    assert v1 != v2
    served = root.parent / "reload-served"
    shutil.copytree(root, served)

    async def scenario(server):
        api = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        old_stream = await api.completions.create(model="b", prompt=prompts[0], max_tokens=long, temperature=0,
                                                  stream=True, extra_body=NO_EOS)
        old_ids = []
        async for chunk in old_stream:
            old_ids.extend(chunk.choices[0].model_extra["token_ids"])
            if len(old_ids) == 2:  # mid-flight: swap the files and reload
                shutil.rmtree(served / "b")
                shutil.copytree(spare / "b-v2", served / "b")
                async with aiohttp.ClientSession(headers=server.admin_headers) as http:
                    async with http.post(server.url + "/v1/adapters/b/reload") as r:
                        assert r.status == 200, await r.text()
                        assert (await r.json())["tier"] in ("host", "device")
                new = await api.completions.create(model="b", prompt=prompts[0], max_tokens=long, temperature=0,
                                                   extra_body=NO_EOS)
        return old_ids, new.choices[0].model_extra["token_ids"]

    with ServerThread(model_dir("llama"), adapters_dir=served, max_gpu_adapters=4) as server:
        old_ids, new_ids = asyncio.run(scenario(server))
    assert old_ids == v1  # the request in flight kept the old version throughout
    assert new_ids == v2


def test_sigterm_drains_in_flight_requests_and_exits_0(model_dir):
    port = free_port()
    env = dict(os.environ)  # the session's cache (conftest), its compiled CPU ops built once
    process = subprocess.Popen(
        [sys.executable, "-m", "loradock", "serve", "--model", str(model_dir("llama")), "--port", str(port),
         "--max-gpu-adapters", "0", "--drain-timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        body = json.dumps({"model": "model", "prompt": [1, 5, 6, 7], "max_tokens": 300, "stream": True,
                           "ignore_eos": True, "return_token_ids": True}).encode()
        response = urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", body), timeout=60)
        response.readline()  # the first event is out: the request is in flight
        process.send_signal(signal.SIGTERM)
        rest = response.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=60) == 0
        with pytest.raises(OSError):
            urllib.request.urlopen(url + "/health", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
