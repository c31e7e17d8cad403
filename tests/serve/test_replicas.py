"""`loradock serve --replicas 2` on one CPU machine: a real Ray instance started here (2 CPUs, no dashboard), two
engine replicas of the tiny llama (half a CPU and one torch thread each) behind the ingress, talked to over HTTP.

One cluster serves the module (about 40 s to start and stop on 2 cores, plus the replica restart of the kill test);
at the end Ray is stopped and no process of it may be left.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import psutil
import pytest
import ray
from lora_workload import ADAPTERS, MAX_NEW, expected
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from http_client import OpenStream, call
from loradock.serve.cluster import APP_NAME, ClusterSettings, build_cluster_state
from loradock.serve.engine import SamplingParams
from loradock.serve.replica import ReplicaCall, ReplicaReport
from server_support import MODEL_NAME, ServerThread
from support import peft_greedy, varied_prompts, wait_until

RAY_PROCESSES = ("raylet", "gcs_server", "ray::", "default_worker", "dashboard", "log_monitor", "runtime_env")


def _ray_children() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any(name in " ".join(child.cmdline()) for name in RAY_PROCESSES):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="module")
def cluster(model_dir, adapter_dir, tmp_path_factory):
    settings = ClusterSettings(replicas=2, replica_cpus=0.5, threads=1, max_ongoing_requests=8)
    server = ServerThread(model_dir("llama"), adapters_dir=adapter_dir, allow_adapter_paths=True, max_num_seqs=8,
                          kv_cache_memory="8MiB", build=partial(build_cluster_state, cluster=settings))
    with pytest.MonkeyPatch.context() as env:
        # The replicas share the test session's cache (the compiled CPU ops are built once) through the environment
        # the local Ray instance hands its workers.
        env.setenv("LORADOCK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "loradock-cache"))
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        try:
            with server as running:
                yield running
        finally:
            serve.shutdown()
            ray.shutdown()
    assert wait_until(lambda: not _ray_children(), timeout=30), [p.cmdline() for p in _ray_children()]


def complete_reply(server, model: str, prompt, max_tokens: int = MAX_NEW):
    return call(server.url, "POST", "/v1/completions",
                {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def complete(server, model: str, prompt, max_tokens: int = MAX_NEW) -> dict:
    reply = complete_reply(server, model, prompt, max_tokens)
    assert reply.status == 200, reply.body[:500]
    return reply.json()


def balanced_calls(server, adapter: str, prompt, calls: int = 16) -> list[tuple[str, list[int]]]:
    """(replica, greedy tokens) of `calls` calls straight to the deployment with the adapter's registration but no
    multiplexed id: Ray balances them over the replicas (all on one replica: odds 2 in 2**calls)."""
    ref = server.engine.resolve_adapter(adapter).ref()
    handle = serve.get_app_handle(APP_NAME).options(stream=True)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0)
    results = []
    for i in range(calls):
        items = list(handle.generate.remote(ReplicaCall(prompt, params, ref, f"balanced-{adapter}-{i}")))
        results.append((items[-1].replica, [output.token_id for batch in items[:-1] for output in batch]))
    return results


def served_by(server) -> dict[str, int]:
    """Adapter requests each replica has taken so far (hits and misses), from the replicas' own reports."""
    return {replica: sum(report.adapter_requests.values()) for replica, report in server.engine.replicas.items()}


def test_the_openai_client_gets_peft_outputs_from_the_replicas(cluster, model_dir, adapter_dir, workload):
    """Base and adapter requests through the official client, streamed and whole: token for token PEFT's."""
    client = OpenAI(base_url=cluster.url + "/v1", api_key="unused")
    want = expected(model_dir, adapter_dir, workload)

    def run(index: int) -> list[int]:
        adapter, prompt = workload[index]
        model = adapter or MODEL_NAME
        if index % 2:
            chunks = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0,
                                               stream=True, extra_body={"return_token_ids": True})
            return [t for chunk in chunks for t in chunk.choices[0].token_ids]
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0,
                                           extra_body={"return_token_ids": True})
        return answer.choices[0].token_ids

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, range(len(workload))))
    assert got == want
    assert {m.id for m in client.models.list().data} == {MODEL_NAME, *ADAPTERS}


def test_an_unknown_model_is_a_404_in_openais_shape(cluster):
    reply = call(cluster.url, "POST", "/v1/completions", {"model": "nope", "prompt": "hi", "max_tokens": 2})
    assert reply.status == 404 and reply.error["code"] == "model_not_found"


def test_warm_adapter_requests_reach_a_replica_that_holds_them(cluster, tokenizer):
    """48 requests over the three adapters, six at a time, after one each to warm: >= 90% find their adapter
    already on the replica they reach (the replicas' own hit/miss counters)."""
    prompts = varied_prompts(tokenizer, 4, seed=3)
    for name in ADAPTERS:
        complete(cluster, name, prompts[0], max_tokens=2)

    def totals() -> tuple[int, int]:
        reports = cluster.engine.replicas.values()
        return (sum(r.adapter_requests["hit"] for r in reports), sum(r.adapter_requests["miss"] for r in reports))

    hits0, misses0 = totals()
    names = list(ADAPTERS) * 16
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: complete(cluster, names[i], prompts[i % 4], max_tokens=4), range(len(names))))
    hits, misses = totals()
    assert (hits - hits0) + (misses - misses0) == len(names)
    assert (hits - hits0) / len(names) >= 0.9, (hits - hits0, misses - misses0)


def test_an_adapter_loaded_on_the_cluster_is_served_by_every_replica(cluster, model_dir, tmp_path, tokenizer):
    """Admin load through the ingress (answered once), then load-balanced calls: both replicas serve the new
    adapter, each with PEFT's output."""
    from loradock.loadtest.random_adapters import write_random_adapter

    path = write_random_adapter(model_dir("llama"), tmp_path / "fresh", seed=9, r=4, target_modules=["q_proj"])
    reply = call(cluster.url, "POST", "/v1/adapters", {"name": "fresh", "path": str(path)},
                 headers=cluster.admin_headers)
    assert reply.status == 201, reply.body[:500]
    assert reply.json()["tier"] == "cluster" and reply.json()["version"] == 1 and reply.json()["rank"] == 4
    prompt = varied_prompts(tokenizer, 1, seed=5)[0]
    want = peft_greedy(model_dir("llama"), path, [prompt], MAX_NEW)[0]
    results = balanced_calls(cluster, "fresh", prompt)
    assert len({replica for replica, _ in results}) == 2
    assert all(tokens == want for _, tokens in results)


def test_a_name_unloaded_and_loaded_again_serves_the_new_adapter_on_every_replica(cluster, model_dir, adapter_dir,
                                                                                  tokenizer):
    """Both replicas hold the first adapter of the name; after unload (404 at once) and a load of another adapter
    under the same name (version 1 again), every replica serves the new one."""
    admin, prompt = cluster.admin_headers, varied_prompts(tokenizer, 1, seed=7)[0]
    first = {"name": "again", "path": str(adapter_dir / "qv-r8")}
    assert call(cluster.url, "POST", "/v1/adapters", first, headers=admin).status == 201
    assert len({replica for replica, _ in balanced_calls(cluster, "again", prompt)}) == 2
    assert call(cluster.url, "DELETE", "/v1/adapters/again", headers=admin).status == 200
    assert complete_reply(cluster, "again", prompt).status == 404
    second = {"name": "again", "path": str(adapter_dir / "mlp-patterns")}
    reply = call(cluster.url, "POST", "/v1/adapters", second, headers=admin)
    assert reply.status == 201 and reply.json()["version"] == 1
    want = peft_greedy(model_dir("llama"), adapter_dir / "mlp-patterns", [prompt], MAX_NEW)[0]
    results = balanced_calls(cluster, "again", prompt)
    assert len({replica for replica, _ in results}) == 2
    assert all(tokens == want for _, tokens in results)


def test_per_replica_metrics_and_the_vllm_lora_gauge(cluster):
    complete(cluster, MODEL_NAME, "hello", max_tokens=2)
    body = call(cluster.url, "GET", "/metrics").body.decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    replicas = {s.labels["replica"] for s in families["loradock_running_requests"].samples}
    assert replicas == set(cluster.engine.replicas)
    (info,) = families["vllm:lora_requests_info"].samples
    assert info.labels["max_lora"] == str(2 * 8)  # two replicas of eight device slots
    assert time.time() - info.value < 60


def test_a_hot_adapter_spreads_to_the_other_replica_when_its_holder_is_full(cluster, adapter_dir, tokenizer):
    """24 long requests at once for an adapter one replica holds: it takes 8 (max_ongoing_requests), and after the
    router's matching timeout (1-2 s) the rest go to the other replica, which loads the adapter too."""
    load = {"name": "hot", "path": str(adapter_dir / "all-r16-rslora")}
    assert call(cluster.url, "POST", "/v1/adapters", load, headers=cluster.admin_headers).status == 201
    prompt = varied_prompts(tokenizer, 1, seed=10)[0]
    complete(cluster, "hot", prompt, max_tokens=2)
    before = served_by(cluster)
    body = {"model": "hot", "prompt": prompt, "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(lambda _: call(cluster.url, "POST", "/v1/completions", body), range(24)))
    assert all(reply.status == 200 for reply in replies)
    after = served_by(cluster)
    assert all(after[replica] > before.get(replica, 0) for replica in after) and len(after) == 2


def _fresh_reports(prompt) -> dict[str, ReplicaReport]:
    """Each replica's report as of now: base-model calls straight to the deployment, balanced over the replicas."""
    handle = serve.get_app_handle(APP_NAME).options(stream=True)
    params = SamplingParams(max_tokens=2, temperature=0)
    reports = {}
    for i in range(40):  # odds that 40 balanced calls miss a replica: 2 in 2**40
        report = list(handle.generate.remote(ReplicaCall(prompt, params, None, f"probe-{i}")))[-1]
        reports[report.replica] = report
        if len(reports) == 2:
            break
    return reports


def _adapters_held_by_one_replica_each(cluster, adapter_dir, prompt, attempt: int) -> tuple[str, str]:
    """(an adapter only one replica holds, one only the other holds). An adapter loaded by the admin API is held by
    the one replica that loaded it until a request goes elsewhere: a few loads settle it."""
    for i in range(8):
        x, y = _fresh_reports(prompt).values()
        only_x, only_y = sorted(x.adapters - y.adapters), sorted(y.adapters - x.adapters)
        if only_x and only_y:
            return only_x[0], only_y[0]
        reply = call(cluster.url, "POST", "/v1/adapters", {"name": f"kill-{attempt}-{i}",
                                                           "path": str(adapter_dir / "qv-r8")},
                     headers=cluster.admin_headers)
        assert reply.status == 201, reply.body[:500]
    raise AssertionError("no adapter is held by one replica only")


def _streams_split_over_the_replicas(cluster, adapter_dir, prompt, body) -> tuple[list, ReplicaReport, ReplicaReport]:
    """Six (adapter, stream) in flight, three on each of two adapters, and the two replicas' reports taken while they
    run: some adapter runs on the first replica only, another on the second only. Ray's router places a stream from
    its own view of which replica holds which adapter, which can lag the replicas' reports: so the placement is read
    while the streams run, and set up again when it is not split."""
    for attempt in range(5):
        names = _adapters_held_by_one_replica_each(cluster, adapter_dir, prompt, attempt)
        streams = [(name, OpenStream(cluster.url, "/v1/completions", {**body, "model": name}))
                   for name in [names[0]] * 3 + [names[1]] * 3]
        for _, stream in streams:  # every stream has its first token: all six are in flight
            assert stream.status == 200 and "choices" in stream.next_event()
        reports = list(_fresh_reports(prompt).values())
        x, y = (report.engine.running_adapters for report in reports)
        if x - y and y - x:
            return streams, *reports
        for _, stream in streams:  # dropped: each replica aborts its requests
            stream.close()
    raise AssertionError("the router never split two adapters' streams over the two replicas")


def test_a_killed_replica_fails_only_its_requests_and_ray_restarts_it(cluster, adapter_dir, tokenizer):
    """Streams on two adapters running on different replicas; one replica process is killed mid-stream: its streams
    end with a clear error event, the other replica's finish whole, and Ray brings the replica back."""
    prompt = varied_prompts(tokenizer, 1, seed=8)[0]
    body = {"prompt": prompt, "max_tokens": 1500, "temperature": 0, "ignore_eos": True}  # seconds of tokens
    streams, victim, survivor = _streams_split_over_the_replicas(cluster, adapter_dir, prompt, body)
    on_victim = victim.engine.running_adapters - survivor.engine.running_adapters
    on_survivor = survivor.engine.running_adapters - victim.engine.running_adapters
    os.kill(victim.pid, signal.SIGKILL)
    failed, finished = set(), set()  # the adapters of streams that ended with an error event, and whole
    for name, stream in streams:
        with stream:
            events = []
            while (event := stream.next_event()) != "[DONE]":
                events.append(event)
        last = events[-1]
        if "error" in last:
            assert last["error"]["code"] == "replica_failed" and "replica" in last["error"]["message"]
            failed.add(name)
        else:
            assert last["choices"][0]["finish_reason"] == "length"
            finished.add(name)
    assert on_victim <= failed - finished and on_survivor <= finished - failed, (on_victim, on_survivor, failed)

    victim_name, victim_pid = sorted(on_victim)[0], victim.pid
    assert complete(cluster, victim_name, prompt)["choices"][0]["finish_reason"] in ("length", "stop")  # elsewhere

    def replaced() -> bool:  # base requests are balanced over the replicas: the new one reports soon
        complete(cluster, MODEL_NAME, prompt, max_tokens=2)
        return any(r.pid != victim_pid and r.replica not in known for r in cluster.engine.replicas.values())

    known = set(cluster.engine.replicas)
    assert wait_until(replaced, timeout=180)
    status = serve.status().applications[APP_NAME].deployments["engine"]
    assert status.replica_states.get("RUNNING", 0) == 2


def test_every_use_of_serves_multiplexing_api_is_in_one_module():
    """Upstream is renaming the API: serve/multiplex.py is the one place to change (no cluster needed)."""
    from pathlib import Path

    import loradock

    root = Path(loradock.__file__).parent
    uses = {path.relative_to(root).as_posix() for path in root.rglob("*.py") if "tests" not in path.parts
            and any(word in path.read_text() for word in ("multiplexed(", "get_multiplexed_model_id",
                                                          "multiplexed_model_id="))}
    assert uses == {"serve/multiplex.py"}
