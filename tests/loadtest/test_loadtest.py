"""`loradock loadtest` against a real loradock server on 127.0.0.1 (a tiny model): counts, percentiles, errors by
status, the model distributions and Poisson arrivals (seeded, checked statistically: no wall-clock asserts), think
time (a client's gaps are at least its seeded pauses: a lower bound a slow machine only widens), and the JSON and PNG
files."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import statistics
from collections import Counter
from dataclasses import replace

import pytest
from loradock.loadtest import loadtest as lt
from loradock.loadtest.random_adapters import write_random_adapter
from loradock import cli
from server_support import MODEL_NAME, ServerThread, free_port

MAX_TOKENS = 5


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loadtest-adapters")
    for seed, name in enumerate(("a", "b"), start=1):
        write_random_adapter(model_dir("llama"), root / name, seed=seed, r=4, lora_alpha=8, target_modules="all-linear")
    return root


@pytest.fixture(scope="module")
def server(model_dir, adapters):
    with ServerThread(model_dir("llama"), adapters_dir=adapters, max_gpu_adapters=2, max_lora_rank=8) as running:
        yield running


@pytest.fixture(scope="module")
def ordinary_ids(model_dir):
    return lt.ordinary_token_ids(str(model_dir("llama")))


def spec(server, ordinary_ids, **kw) -> lt.LoadSpec:
    options = lt.RequestOptions(max_tokens=kw.pop("max_tokens", MAX_TOKENS), stream=kw.pop("stream", True),
                                timeout=kw.pop("timeout", 60.0))
    defaults = {"url": server.url, "models": [MODEL_NAME, "a", "b"], "concurrency": 4, "requests": 12,
                "prompt_len": (3, 12), "seed": 3, "options": options, "ordinary_ids": ordinary_ids, "time_limit": 60.0}
    return lt.LoadSpec(**(defaults | kw))


def run(load: lt.LoadSpec) -> tuple[lt.RunResult, dict]:
    result = asyncio.run(lt.run_load(load))
    return result, result.report()


def assert_ordered(distribution: dict) -> None:
    assert distribution["count"] > 0
    assert distribution["min"] <= distribution["p50"] <= distribution["p90"] <= distribution["p99"] <= distribution["max"]


def test_report_counts_percentiles_and_files(server, ordinary_ids, tmp_path):
    load = spec(server, ordinary_ids, distribution="uniform")
    result, report = run(load)
    assert (report["requests"], report["ok"], report["failed"]) == (12, 12, 0)
    assert report["errors_by_status"] == {}
    assert report["output_tokens"] == 12 * MAX_TOKENS and report["short_outputs"] == 0
    assert all(r.finish_reason == "length" and r.output_tokens == MAX_TOKENS for r in result.records)
    assert sum(m["requests"] for m in report["per_model"].values()) == 12
    latency = report["latency_ms"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        assert_ordered(latency[name])
    assert latency["ttft"]["count"] == latency["e2e"]["count"] == 12
    assert latency["itl"]["count"] == 12 * (MAX_TOKENS - 1)  # one streamed chunk per token
    assert all(r.ttft <= r.e2e for r in result.records)
    assert report["output_tokens_per_s"] == pytest.approx(report["output_tokens"] / report["duration_s"])
    assert report["requests_per_s"] == pytest.approx(12 / report["duration_s"])
    cold = report["cold_ttft_ms"]["first_request_of_model"]
    assert cold["count"] == len({r.model for r in result.records})  # one first request per model
    series = report["timeseries"]
    assert sum(series["output_tokens_per_s"]) * series["bin_s"] == pytest.approx(report["output_tokens"])

    out, png = tmp_path / "results.json", tmp_path / "results.png"
    lt.write_json(report, result, out)
    from loradock.loadtest.plot import plot_run

    plot_run(result.records, report, png)
    saved = json.loads(out.read_text())
    assert saved["ok"] == 12 and len(saved["records"]) == 12 and saved["latency_ms"]["ttft"]["p50"] > 0
    assert_valid_png(png)


def assert_valid_png(path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width >= 600 and height >= 400
    assert path.stat().st_size < 300_000  # small enough to commit


def test_errors_are_counted_by_status(server, ordinary_ids):
    _, report = run(spec(server, ordinary_ids, models=["a", "no-such-model"], distribution="distinct", requests=6,
                         concurrency=2))
    assert (report["ok"], report["failed"]) == (3, 3)
    assert report["errors_by_status"] == {"404": 3}
    assert "no-such-model" in report["error_examples"]["404"]
    assert report["per_model"]["no-such-model"] == {"requests": 3, "ok": 0, "output_tokens": 0}
    assert report["latency_ms"]["e2e"]["count"] == 3  # failures stay out of the latency figures

    # a prompt longer than the context: the server's 413 is counted under its own status
    _, report = run(spec(server, ordinary_ids, requests=2, concurrency=2, prompt_len=(5000, 5000)))
    assert report["errors_by_status"] == {"413": 2}


def test_connection_errors_and_timeouts_are_counted(server, ordinary_ids):
    closed = f"http://127.0.0.1:{free_port()}"
    _, report = run(spec(server, ordinary_ids, url=closed, requests=3, concurrency=3))
    assert report["errors_by_status"] == {"connection_error": 3} and report["ok"] == 0

    _, report = run(spec(server, ordinary_ids, requests=2, concurrency=2, timeout=1e-4, max_tokens=50))
    assert report["errors_by_status"] == {"timeout": 2}


def test_models_follow_the_seeded_distribution_through_the_server(server, ordinary_ids):
    models = [MODEL_NAME, "a", "b"]
    for distribution in ("zipf:1.2", "distinct", "uniform"):
        load = spec(server, ordinary_ids, models=models, distribution=distribution, requests=9, concurrency=3)
        expected = [p.model for p in load.workload().take(9)]
        result, report = run(load)
        assert [r.model for r in result.records] == expected
        assert {m: v["requests"] for m, v in report["per_model"].items()} == dict(Counter(expected))
    assert expected != [p.model for p in spec(server, ordinary_ids, distribution="uniform", seed=4).workload().take(9)]


def test_distributions_pick_models_as_specified():
    models = [f"m{i}" for i in range(5)]
    n = 20_000
    distinct = lt.ModelPicker(models, "distinct", seed=0)
    assert [distinct.pick(i) for i in range(12)] == [models[i % 5] for i in range(12)]

    def picks(kind: str) -> Counter:
        picker = lt.ModelPicker(models, kind, seed=1)
        return Counter(picker.pick(i) for i in range(n))

    uniform = picks("uniform")
    assert set(uniform) == set(models)
    assert all(abs(count / n - 0.2) < 0.015 for count in uniform.values())

    zipf = picks("zipf:1.0")
    harmonic = sum(1 / k for k in range(1, 6))
    for k, model in enumerate(models, start=1):
        assert abs(zipf[model] / n - (1 / k) / harmonic) < 0.015
    assert [zipf[m] for m in models] == sorted((zipf[m] for m in models), reverse=True)

    steep = picks("zipf:2.5")
    assert steep["m0"] / n > 0.7  # a steeper alpha concentrates on the first model

    def sequence(kind, seed):
        picker = lt.ModelPicker(models, kind, seed)
        return [picker.pick(i) for i in range(50)]

    assert sequence("zipf:1.0", 7) == sequence("zipf:1.0", 7) != sequence("zipf:1.0", 8)
    assert sequence("uniform", 7) == sequence("uniform", 7) != sequence("uniform", 8)
    for bad in ("zipf:x", "zipf:-1", "pareto", "uniform:2"):
        with pytest.raises(ValueError):
            lt.parse_distribution(bad)


def test_poisson_arrivals_have_the_asked_mean_rate():
    rate, n = 40.0, 20_000
    offsets = [t for t, _ in zip(lt.poisson_offsets(rate, seed=5), range(n))]
    gaps = [b - a for a, b in zip([0.0] + offsets, offsets)]
    assert all(g > 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    # arrivals in disjoint one-second windows are Poisson(rate): mean and variance both ≈ rate
    per_second = Counter(int(t) for t in offsets if t < int(offsets[-1]))
    counts = [per_second.get(s, 0) for s in range(int(offsets[-1]))]
    assert statistics.fmean(counts) == pytest.approx(rate, rel=0.03)
    assert statistics.pvariance(counts) == pytest.approx(rate, rel=0.25)
    assert offsets[:10] == [t for t, _ in zip(lt.poisson_offsets(rate, seed=5), range(10))]


def test_open_loop_run_sends_at_the_planned_arrivals(server, ordinary_ids):
    load = spec(server, ordinary_ids, rate=200.0, concurrency=None, requests=8)
    planned = [p.send_at for p in load.workload().take(8)]
    result, report = run(load)
    assert report["ok"] == 8 and report["settings"]["rate"] == 200.0
    assert [r.scheduled for r in result.records] == planned
    assert all(a < b for a, b in itertools.pairwise(planned))


def test_duration_bound_run_stops_by_itself(server, ordinary_ids):
    result, report = run(spec(server, ordinary_ids, requests=None, duration=0.3, concurrency=2, max_tokens=2))
    assert 1 <= report["requests"] < lt.MAX_REQUESTS and report["failed"] == 0
    assert not result.stopped_early


def test_closed_loop_clients_pause_their_seeded_think_time_between_requests(server, ordinary_ids):
    load = spec(server, ordinary_ids, concurrency=1, requests=4, think=0.05)
    result, report = run(load)
    assert report["ok"] == 4 and "concurrency 1, think 0.05 s" in lt.format_report(report)
    pauses = random.Random(f"think-{load.seed}-0")
    for before, after in itertools.pairwise(sorted(result.records, key=lambda r: r.start)):
        assert after.start - before.end >= pauses.expovariate(1 / 0.05) - 1e-3  # the sleep may end a tick early


def test_think_time_is_for_the_closed_loop_only(server, ordinary_ids):
    with pytest.raises(ValueError, match="--think"):
        spec(server, ordinary_ids, rate=5.0, think=0.1)
    with pytest.raises(ValueError, match="--think"):
        spec(server, ordinary_ids, think=0.0)


def test_not_streamed(server, ordinary_ids):
    _, report = run(spec(server, ordinary_ids, stream=False, requests=4))
    assert report["ok"] == 4 and report["output_tokens"] == 4 * MAX_TOKENS
    assert report["latency_ms"]["ttft"] == {"count": 0}
    assert_ordered(report["latency_ms"]["e2e"])


def test_cli_command_writes_json_and_png(server, adapters, model_dir, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code = cli.main(["loadtest", "--url", server.url, "--adapters-dir", str(adapters), "--distribution", "zipf:1.0",
                     "--concurrency", "3", "--requests", "6", "--prompt-len", "4:9", "--max-tokens", "3",
                     "--tokenizer", str(model_dir("llama")), "--warmup", "2", "--seed", "1", "--out", str(out),
                     "--plot", str(png), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "requests 6: ok 6, failed 0" in printed and "TTFT" in printed and "output tokens/s" in printed
    saved = json.loads(out.read_text())
    assert saved["requests"] == 6 and set(saved["per_model"]) <= {"a", "b"}
    assert saved["settings"]["distribution"] == "zipf:1.0" and saved["settings"]["prompts"] == "token ids"
    assert all(4 <= r["prompt_len"] <= 9 for r in saved["records"])
    assert_valid_png(png)


def test_models_default_to_the_servers_list_and_words_prompts(server, capsys):
    code = cli.main(["loadtest", "--url", server.url, "--concurrency", "2", "--requests", "3", "--max-tokens", "2",
                     "--prompt-len", "3:6", "--quiet"])
    assert code == 0
    assert "3 model(s)" in capsys.readouterr().out  # base + a + b from /v1/models


def test_shared_prefix_chats_send_each_models_seeded_system_prompt_and_find_it_cached(server, capsys):
    """Chat requests, one system prompt per model (the same each time, seeded) and a different user turn each time;
    after the warm-up (one request per model) every request finds its model's system prompt in the prefix cache."""
    load = spec(server, None, distribution="distinct", shared_prefix=60, prompt_len=(3, 8), requests=9,
                concurrency=1, warmup=3)
    plans = load.workload().take(9)
    systems = {model: {p.system for p in plans if p.model == model} for model in load.models}
    assert all(len(prompts) == 1 for prompts in systems.values()) and len(set.union(*systems.values())) == 3
    assert all(len(p.system.split()) == 60 and 3 <= len(p.prompt.split()) <= 8 for p in plans)
    assert len({p.prompt for p in plans}) == 9
    assert [p.system for p in load.workload().take(9)] == [p.system for p in plans]  # seeded
    assert replace(load, seed=4).workload().next().system != plans[0].system
    result, report = run(load)
    assert report["ok"] == 9 and report["output_tokens"] == 9 * MAX_TOKENS and report["short_outputs"] == 0
    assert all(r.prompt_tokens > 60 and 0 < r.cached_tokens < r.prompt_tokens for r in result.records)
    assert 0 < report["prompt_cache"]["cached_share"] < 1
    assert "found cached" in lt.format_report(report) and "system prompt of 60 words" in lt.format_report(report)
    tenants = [lt.TenantLoad("t1", "k1", concurrency=1), lt.TenantLoad("t2", "k2", concurrency=1)]
    streams = replace(load, tenants=tenants).streams()
    assert len({stream.workload().next().system for _, stream in streams}) == 2  # each tenant its own


def test_only_loopback_targets_unless_allowed():
    lt.check_loopback("http://127.0.0.1:8000")
    lt.check_loopback("http://localhost:8000")
    for url in ("http://10.1.2.3:8000", "http://192.0.2.7", "ftp://127.0.0.1"):
        with pytest.raises(ValueError):
            lt.check_loopback(url)
    with pytest.raises(ValueError):
        lt.LoadSpec(url="http://127.0.0.1:1", models=["m"], requests=0)
    assert lt.LoadSpec(url="http://127.0.0.1:1", models=["m"]).requests == lt.DEFAULT_REQUESTS


def test_percentile_interpolates_like_numpy():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert lt.percentile(values, 50) == 3.0
    assert lt.percentile(values, 90) == pytest.approx(4.6)
    assert lt.percentile([7.0], 99) == 7.0
    assert math.isnan(lt.percentile([], 50))
