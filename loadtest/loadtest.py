"""`loradock loadtest`: load any OpenAI-compatible completions server (loradock, vLLM, ...) and report latency.

    loradock loadtest --url http://127.0.0.1:8000 --adapters-dir ./adapters --distribution zipf:1.0 \\
        --concurrency 32 --requests 96 --prompt-len 16:64 --max-tokens 64 --stream \\
        --out results.json --plot results.png

What a run does:

- **Workload**, fully determined by `--seed`: request i names a model picked by `--distribution` (`uniform`,
  `zipf:ALPHA` over the models in the order given, `distinct`: round robin, so consecutive requests use
  different models), has a prompt of a length uniform in `--prompt-len` (random token ids from `--tokenizer`'s
  vocabulary, which both loradock and vLLM accept as `prompt`; without a tokenizer, random English words and the
  lengths count words), and asks for exactly `--max-tokens` tokens (`ignore_eos`, greedy), or a seeded number
  uniform in `--output-len MIN:MAX` (answers of one length all end in the same step: batches run in waves).
- **Shared prefix**: with `--shared-prefix N` every request is a chat (`/v1/chat/completions`): a system prompt of N
  seeded random words, one per model (and per tenant: each has a seed of its own), then a user turn of
  `--prompt-len` random words, different each time, as apps built on an adapter send them. Common words are about
  one token each; the report gives the prompt tokens the server counted and the share it found cached
  (`usage.prompt_tokens_details.cached_tokens`, when the server reports it).
- **Load**: `--concurrency C` keeps C requests in flight (closed loop; with `--think S`, each of the C clients pauses
  a seeded exponential time of mean S seconds between its requests, so its sends do not follow the server's
  steps); `--rate R` sends requests at Poisson arrivals of mean rate R per second (open loop; with `--concurrency`
  too, at most C in flight). It stops after `--requests N` or after `--duration S` seconds of sending, whichever
  comes first; each request has a timeout and the whole run a hard time limit, so every run ends by itself.
- **Tenants**: each `--tenant name=N,key=K,concurrency=C|rate=R[,think=S][,output_len=MIN:MAX][,models=a+b]` is a
  load of its own, all at once: its key, its load, its answer lengths (default: the run's), its models (default:
  what `GET /v1/models` lists for its key), its own seeded workload;
  `--requests` and `--duration` bound each tenant's stream.
- **Report**: p50/p90/p99 (and mean) of time to first token (TTFT), time per output token after the first
  (TPOT), inter-token latency (ITL, the gaps between streamed chunks) and end-to-end latency; requests/s and
  output tokens/s over the run; errors by HTTP status (or `timeout`, `connection_error`, `stream_error`); TTFT of
  each model's first request in the run (a cold adapter) against the rest; the load generator's own CPU use;
  with tenants, each tenant's requests, errors, TTFT, tokens and service (prompt + 2 x output tokens, the unit
  of fair scheduling); the prompt tokens the server counted, and how many of them it found cached.
  `--out` writes it all as JSON (with per-request records and a throughput time series), `--plot` as a PNG.

Traffic goes only to loopback addresses unless `--allow-remote` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import ipaddress
import itertools
import json
import math
import random
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from .stats import percentile

DEFAULT_REQUESTS = 100
DEFAULT_CONCURRENCY = 8
MAX_REQUESTS = 1_000_000  # a hard cap on any run, whatever its flags

# Prompts without a tokenizer: plain common words, so every tokenizer makes ordinary tokens of them.
WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the of and to in is was for that with as on by at from his her they this which are be had not an or but "
    "have one all were there their we when been who will more if no out so said what up its about into than them "
    "can only other new some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three small river garden window paper story light music water house "
    "number morning system question country school family city order market table letter winter answer"
).split()


# ---- the workload ------------------------------------------------------------------------------------------


def parse_distribution(text: str) -> tuple[str, float]:
    """'uniform' | 'distinct' | 'zipf:ALPHA' -> (kind, alpha)."""
    kind, _, value = text.partition(":")
    if kind in ("uniform", "distinct") and not value:
        return kind, 0.0
    if kind == "zipf":
        try:
            alpha = float(value) if value else 1.0
        except ValueError:
            alpha = -1.0
        if alpha >= 0 and math.isfinite(alpha):
            return kind, alpha
    raise ValueError(f"--distribution takes uniform, distinct or zipf:ALPHA (ALPHA >= 0), not {text!r}")


def zipf_weights(count: int, alpha: float) -> list[float]:
    """P(model of rank k) ∝ 1 / k^alpha, k = 1..count (alpha 0: uniform)."""
    raw = [1.0 / (k**alpha) for k in range(1, count + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class ModelPicker:
    """Which model request i names; seeded, so the same seed gives the same sequence."""

    def __init__(self, models: Sequence[str], distribution: str, seed: int):
        if not models:
            raise ValueError("no models to send requests to")
        self.models = list(models)
        self.kind, alpha = parse_distribution(distribution)
        self.rng = random.Random(f"models-{seed}")
        weights = zipf_weights(len(self.models), alpha) if self.kind == "zipf" else None
        self.cumulative = list(_accumulate(weights)) if weights else None

    def pick(self, index: int) -> str:
        if self.kind == "distinct":
            return self.models[index % len(self.models)]
        if self.kind == "uniform":
            return self.models[self.rng.randrange(len(self.models))]
        position = bisect.bisect_right(self.cumulative, self.rng.random() * self.cumulative[-1])
        return self.models[min(position, len(self.models) - 1)]


def _accumulate(values: Sequence[float]) -> Iterator[float]:
    total = 0.0
    for v in values:
        total += v
        yield total


def poisson_offsets(rate: float, seed: int) -> Iterator[float]:
    """Send times (seconds from the start) of a Poisson process of mean `rate` per second: exponential gaps."""
    if not rate > 0:
        raise ValueError("--rate must be positive")
    rng = random.Random(f"arrivals-{seed}")
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


class PromptMaker:
    """Prompts of a seeded random length in [low, high]: token ids from `ordinary_ids`, or words."""

    def __init__(self, lengths: tuple[int, int], seed: int, ordinary_ids: Sequence[int] | None = None):
        self.low, self.high = lengths
        self.ordinary_ids = list(ordinary_ids) if ordinary_ids is not None else None
        self.rng = random.Random(f"prompts-{seed}")

    def make(self) -> str | list[int]:
        length = self.rng.randint(self.low, self.high)
        if self.ordinary_ids is not None:
            return self.rng.choices(self.ordinary_ids, k=length)
        return " ".join(self.rng.choices(WORDS, k=length))


def ordinary_token_ids(tokenizer_path: str) -> list[int]:
    """Every id of a local HF tokenizer except its special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    special = set(tokenizer.all_special_ids)
    return [t for t in range(len(tokenizer)) if t not in special]


class SystemPrompts:
    """With a shared prefix: each model's system prompt, `words` seeded random words (seeded by the run and the
    model)."""

    def __init__(self, words: int, seed: int):
        self.words, self.seed = words, seed
        self._prompts: dict[str, str] = {}

    def of(self, model: str) -> str:
        if model not in self._prompts:
            rng = random.Random(f"system-{self.seed}-{model}")
            self._prompts[model] = " ".join(rng.choices(WORDS, k=self.words))
        return self._prompts[model]


@dataclass
class PlannedRequest:
    index: int
    model: str
    prompt: str | list[int]  # with `system`, the user's turn of a chat
    send_at: float | None  # seconds after the start (open loop); None: as soon as a slot is free
    max_tokens: int | None = None  # None: the run's --max-tokens
    system: str | None = None  # a chat request: this system prompt, then `prompt` as the user's turn


class Workload:
    """The requests of a run, in order, made lazily from the seed (a duration-bound run has no known count)."""

    def __init__(self, models: Sequence[str], distribution: str, prompt_len: tuple[int, int], seed: int,
                 rate: float | None = None, ordinary_ids: Sequence[int] | None = None,
                 output_len: tuple[int, int] | None = None, systems: SystemPrompts | None = None):
        self.picker = ModelPicker(models, distribution, seed)
        self.prompts = PromptMaker(prompt_len, seed, ordinary_ids if systems is None else None)
        self.systems = systems
        self.arrivals = poisson_offsets(rate, seed) if rate else None
        self.output_len = output_len
        self.output_rng = random.Random(f"outputs-{seed}")
        self.count = 0

    def next(self) -> PlannedRequest:
        index = self.count
        self.count += 1
        send_at = next(self.arrivals) if self.arrivals is not None else None
        max_tokens = self.output_rng.randint(*self.output_len) if self.output_len else None
        model = self.picker.pick(index)
        system = self.systems.of(model) if self.systems is not None else None
        return PlannedRequest(index, model, self.prompts.make(), send_at, max_tokens, system)

    def take(self, n: int) -> list[PlannedRequest]:
        return [self.next() for _ in range(n)]


# ---- one request -------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What the client saw of one request. Times are seconds from the start of the run."""

    index: int
    model: str
    prompt_len: int  # tokens (token-id prompts) or words
    scheduled: float | None  # planned send time (open loop)
    start: float  # sent
    end: float = 0.0
    status: str = "ok"  # "ok", an HTTP status like "404", or timeout | connection_error | stream_error
    error: str | None = None
    ttft: float | None = None  # to the first chunk with a token (streaming only)
    output_tokens: int = 0
    finish_reason: str | None = None
    cold: bool = False  # the first request of its model in this run
    token_times: list[float] = field(default_factory=list)  # arrival of each token-bearing chunk (streaming)
    tenant: str | None = None  # whose key sent it (--tenant)
    max_tokens: int | None = None  # asked for
    prompt_tokens: int | None = None  # as the server counted them (usage)
    cached_tokens: int | None = None  # of them, found in its prefix cache (usage.prompt_tokens_details)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]


@dataclass
class RequestOptions:
    max_tokens: int = 64
    stream: bool = True
    temperature: float = 0.0
    ignore_eos: bool = True
    return_token_ids: bool = True
    timeout: float = 300.0
    extra_body: dict = field(default_factory=dict)
    hang_up_after: int | None = None  # streamed tokens after which the client closes the connection (status hung_up)

    def body(self, model: str, prompt: str | list[int], max_tokens: int | None = None,
             system: str | None = None) -> dict:
        """A completion of `prompt`, or with `system` a chat: the system prompt, then `prompt` as the user's turn."""
        text = {"prompt": prompt} if system is None else \
            {"messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}]}
        body = {"model": model, **text, "max_tokens": max_tokens or self.max_tokens,
                "temperature": self.temperature, "stream": self.stream}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.return_token_ids:
            body["return_token_ids"] = True
        return body | self.extra_body


async def send_request(session: aiohttp.ClientSession, url: str, planned: PlannedRequest, options: RequestOptions,
                       clock: Callable[[], float], headers: dict | None = None) -> RequestRecord:
    """POST one completion; never raises (failures are recorded with their status)."""
    record = RequestRecord(planned.index, planned.model, len(planned.prompt) if isinstance(planned.prompt, list)
                           else len(planned.prompt.split()), planned.send_at, clock(),
                           max_tokens=planned.max_tokens or options.max_tokens)
    try:
        async with asyncio.timeout(options.timeout):
            body = options.body(planned.model, planned.prompt, planned.max_tokens, planned.system)
            async with session.post(url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    record.status = str(resp.status)
                    record.error = _error_message(await resp.text())
                elif options.stream:
                    await _read_stream(resp, record, clock, options)
                else:
                    _read_whole(await resp.json(content_type=None), record)
    except TimeoutError:
        record.status, record.error = "timeout", f"no complete answer within {options.timeout:g} s"
    except aiohttp.ClientPayloadError as exc:
        record.status, record.error = "stream_error", str(exc) or type(exc).__name__
    except (aiohttp.ClientError, OSError) as exc:
        record.status, record.error = "connection_error", str(exc) or type(exc).__name__
    except (ValueError, KeyError, TypeError) as exc:  # a malformed body
        record.status, record.error = "bad_response", f"{type(exc).__name__}: {exc}"
    record.end = clock()
    return record


async def _read_stream(resp: aiohttp.ClientResponse, record: RequestRecord, clock: Callable[[], float],
                       options: RequestOptions) -> None:
    counted, usage_tokens, done = 0, None, False
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            record.status, record.error = "stream_error", _error_message(json.dumps(chunk))
            return
        if chunk.get("usage"):
            usage_tokens = chunk["usage"].get("completion_tokens")
            _read_prompt_usage(chunk["usage"], record)
        for choice in chunk.get("choices") or ():
            ids = choice.get("token_ids")
            n = len(ids) if ids is not None else (1 if choice.get("text") or (choice.get("delta") or {}).get("content")
                                                  else 0)
            if n:
                now = clock()
                if record.ttft is None:
                    record.ttft = now - record.start
                record.token_times.append(now)
                counted += n
            if choice.get("finish_reason"):
                record.finish_reason = choice["finish_reason"]
        if options.hang_up_after is not None and counted >= options.hang_up_after:
            record.status, record.error = "hung_up", f"the client hung up after {counted} tokens"
            record.output_tokens = counted
            return
    if not done:
        record.status, record.error = "stream_error", "the stream ended without data: [DONE]"
    record.output_tokens = usage_tokens if usage_tokens is not None else counted


def _read_whole(body: dict, record: RequestRecord) -> None:
    choice = body["choices"][0]
    record.finish_reason = choice.get("finish_reason")
    usage = body.get("usage") or {}
    ids = choice.get("token_ids")
    record.output_tokens = usage.get("completion_tokens", len(ids) if ids is not None else 0)
    _read_prompt_usage(usage, record)


def _read_prompt_usage(usage: dict, record: RequestRecord) -> None:
    """The prompt tokens the server counted, and those it found cached if it says."""
    record.prompt_tokens = usage.get("prompt_tokens")
    record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
        message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("message")
        if message:
            return str(message)[:300]
    except (ValueError, AttributeError):
        pass
    return text[:300]


# ---- a run -------------------------------------------------------------------------------------------------


@dataclass
class TenantLoad:
    """One tenant's stream in a run: its key, its own load, its models (None: the run's)."""

    name: str
    api_key: str
    concurrency: int | None = None
    rate: float | None = None
    models: list[str] | None = None
    think: float | None = None  # mean seconds each client pauses between its requests (closed loop)
    output_len: tuple[int, int] | None = None  # its answers' lengths (None: the run's)


TENANT_SYNTAX = "name=N,key=K[,concurrency=C][,rate=R][,think=S][,output_len=MIN:MAX][,models=a+b]"


def parse_tenant(text: str) -> TenantLoad:
    """A `--tenant` value (TENANT_SYNTAX) -> TenantLoad."""
    fields = dict(item.partition("=")[::2] for item in text.split(",") if item)
    unknown = set(fields) - {"name", "key", "concurrency", "rate", "think", "output_len", "models"}
    if unknown or not fields.get("name") or not fields.get("key"):
        raise argparse.ArgumentTypeError(f"expected {TENANT_SYNTAX}, not {text!r}")
    try:
        concurrency = int(fields["concurrency"]) if "concurrency" in fields else None
        rate = float(fields["rate"]) if "rate" in fields else None
        think = float(fields["think"]) if "think" in fields else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: concurrency must be an integer, rate and think numbers") from None
    output_len = _range(fields["output_len"]) if "output_len" in fields else None
    models = [m for m in fields["models"].split("+") if m] if fields.get("models") else None
    return TenantLoad(fields["name"], fields["key"], concurrency, rate, models, think, output_len)


@dataclass
class LoadSpec:
    url: str
    models: list[str]
    distribution: str = "uniform"
    rate: float | None = None
    concurrency: int | None = None
    requests: int | None = None
    duration: float | None = None
    prompt_len: tuple[int, int] = (16, 64)
    seed: int = 0
    options: RequestOptions = field(default_factory=RequestOptions)
    ordinary_ids: list[int] | None = None
    warmup: int = 0  # requests sent (closed loop, one per model round robin) before the measured run
    time_limit: float = 3600.0  # the whole run, sending and waiting
    api_key: str | None = None
    tenants: list[TenantLoad] = field(default_factory=list)  # streams of their own, all at once (see streams())
    output_len: tuple[int, int] | None = None  # max_tokens drawn per request (default: options.max_tokens)
    think: float | None = None  # closed loop: mean seconds each client pauses between its requests (exponential)
    shared_prefix: int | None = None  # chat requests after a system prompt of this many words per model

    def __post_init__(self):
        if self.rate is None and self.concurrency is None:
            self.concurrency = DEFAULT_CONCURRENCY
        if self.requests is None and self.duration is None:
            self.requests = DEFAULT_REQUESTS
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("--rate must be positive")
        if self.think is not None and (self.rate is not None or not self.think > 0):
            raise ValueError("--think must be positive, and is for the closed loop (--concurrency), not --rate")
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise ValueError(f"--requests must lie in [1, {MAX_REQUESTS}]")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("--duration must be positive")
        if not 1 <= self.prompt_len[0] <= self.prompt_len[1]:
            raise ValueError("--prompt-len needs 1 <= MIN <= MAX")
        if self.output_len is not None and not 1 <= self.output_len[0] <= self.output_len[1]:
            raise ValueError("--output-len needs 1 <= MIN <= MAX")
        if self.shared_prefix is not None and self.shared_prefix < 1:
            raise ValueError("--shared-prefix must be at least 1 word")
        parse_distribution(self.distribution)

    @property
    def max_requests(self) -> int:
        return self.requests if self.requests is not None else MAX_REQUESTS

    @property
    def endpoint(self) -> str:
        return "/v1/chat/completions" if self.shared_prefix is not None else "/v1/completions"

    def system_prompts(self) -> SystemPrompts | None:
        return SystemPrompts(self.shared_prefix, self.seed) if self.shared_prefix is not None else None

    def workload(self) -> Workload:
        return Workload(self.models, self.distribution, self.prompt_len, self.seed, self.rate, self.ordinary_ids,
                        self.output_len, self.system_prompts())

    def streams(self) -> list[tuple[str | None, LoadSpec]]:
        """The run's streams of requests: this spec alone, or one per tenant (name, its spec: its key, load,
        models and a seed of its own; the rest of this spec)."""
        if not self.tenants:
            return [(None, self)]
        return [(t.name, replace(self, models=t.models or self.models, concurrency=t.concurrency, rate=t.rate,
                                 think=t.think, output_len=t.output_len or self.output_len, api_key=t.api_key,
                                 seed=self.seed + i, tenants=[]))
                for i, t in enumerate(self.tenants)]

    def describe(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("ordinary_ids", "api_key", "tenants")}
        out["prompts"] = "token ids" if self.ordinary_ids is not None and self.shared_prefix is None else "words"
        if self.tenants:
            out["tenants"] = [{k: v for k, v in asdict(t).items() if k != "api_key"} for t in self.tenants]
        return out


@dataclass
class RunResult:
    spec: LoadSpec
    records: list[RequestRecord]
    wall_s: float  # first send to last answer
    client_cpu_s: float  # the load generator's own CPU time (it shares the machine with the server)
    stopped_early: bool = False  # the hard time limit cut the run short

    def report(self) -> dict:
        return summarize(self)


async def run_load(spec: LoadSpec, progress: Callable[[RequestRecord], None] | None = None) -> RunResult:
    """Send the workload and wait for every answer (or its timeout, or the run's hard limit)."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    url = spec.url.rstrip("/") + spec.endpoint
    streams = spec.streams()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _, stream in streams:
            if stream.warmup:
                await _warmup(session, url, stream, _auth(stream.api_key))
        cpu0, t0 = time.process_time(), time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - t0

        driven = await asyncio.gather(*(_drive(session, url, stream, clock, _auth(stream.api_key), progress)
                                        for _, stream in streams))
        cpu = time.process_time() - cpu0
    records, stopped = [], False
    for (tenant, _), (stream_records, stream_stopped) in zip(streams, driven):
        for record in stream_records:
            record.tenant = tenant
        records += stream_records
        stopped |= stream_stopped
    records.sort(key=lambda r: r.index)
    first = min((r.start for r in records), default=0.0)
    last = max((r.end for r in records), default=0.0)
    _mark_cold(records)
    return RunResult(spec, records, max(last - first, 1e-9), cpu, stopped)


def _auth(api_key: str | None) -> dict | None:
    return {"Authorization": f"Bearer {api_key}"} if api_key else None


async def _warmup(session, url: str, spec: LoadSpec, headers) -> None:
    """A few short requests, one model after another (loads adapters, fills caches: with a shared prefix, each
    model's system prompt); not measured."""
    options = RequestOptions(**{**asdict(spec.options), "max_tokens": min(4, spec.options.max_tokens),
                                "timeout": spec.options.timeout})
    planned = Workload(spec.models, "distinct", spec.prompt_len, spec.seed + 10_007, ordinary_ids=spec.ordinary_ids,
                       systems=spec.system_prompts()).take(spec.warmup)
    width = spec.concurrency or DEFAULT_CONCURRENCY
    for i in range(0, len(planned), width):
        await asyncio.gather(*(send_request(session, url, p, options, time.perf_counter, headers)
                               for p in planned[i : i + width]))


async def _drive(session, url: str, spec: LoadSpec, clock, headers, progress) -> tuple[list[RequestRecord], bool]:
    workload = spec.workload()
    records: list[RequestRecord] = []
    deadline = spec.time_limit
    send_until = min(spec.duration if spec.duration is not None else math.inf, deadline)

    def done(record: RequestRecord) -> None:
        records.append(record)
        if progress is not None:
            progress(record)

    async def one(planned: PlannedRequest, slot: asyncio.Semaphore | None) -> None:
        if slot is None:
            done(await send_request(session, url, planned, spec.options, clock, headers))
            return
        async with slot:
            done(await send_request(session, url, planned, spec.options, clock, headers))

    tasks: list[asyncio.Task] = []
    if spec.rate is None:  # closed loop: C workers, each sends its next request when its last one ends

        async def worker(pauses: random.Random) -> None:
            while workload.count < spec.max_requests and clock() < send_until:
                done(await send_request(session, url, workload.next(), spec.options, clock, headers))
                if spec.think is not None:
                    await asyncio.sleep(min(pauses.expovariate(1 / spec.think), max(send_until - clock(), 0.0)))

        tasks = [asyncio.create_task(worker(random.Random(f"think-{spec.seed}-{i}")))
                 for i in range(min(spec.concurrency, spec.max_requests))]
    else:  # open loop: Poisson arrivals, at most C in flight when C is given
        slot = asyncio.Semaphore(spec.concurrency) if spec.concurrency else None
        while workload.count < spec.max_requests:
            planned = workload.next()
            if planned.send_at >= send_until:
                break
            delay = planned.send_at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(planned, slot)))
    stopped = False
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(deadline - clock(), 0.0))
        if pending:  # the hard limit: cancel what is left
            stopped = True
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    return records, stopped


def _mark_cold(records: list[RequestRecord]) -> None:
    seen: set[str] = set()
    for record in sorted(records, key=lambda r: r.start):
        if record.model not in seen:
            seen.add(record.model)
            record.cold = True


# ---- the report --------------------------------------------------------------------------------------------

PERCENTILES = (50, 90, 99)


def distribution_ms(values: Sequence[float]) -> dict:
    """p50/p90/p99, mean, min, max and count of seconds, in milliseconds."""
    if not values:
        return {"count": 0}
    out = {f"p{q}": 1000 * percentile(values, q) for q in PERCENTILES}
    out |= {"mean": 1000 * sum(values) / len(values), "min": 1000 * min(values), "max": 1000 * max(values),
            "count": len(values)}
    return out


def time_series(records: Sequence[RequestRecord], wall: float, bins: int = 60) -> dict:
    """Output tokens/s, completed requests/s and requests in flight per time bin over the run."""
    start = min((r.start for r in records), default=0.0)
    width = max(wall / bins, 0.05)
    n = max(1, math.ceil(wall / width))
    tokens, completed, failed, in_flight = [0.0] * n, [0] * n, [0] * n, [0.0] * n

    def slot(t: float) -> int:
        return min(max(int((t - start) / width), 0), n - 1)

    for r in records:
        if r.token_times:
            per_chunk = r.output_tokens / len(r.token_times) if r.ok else 1
            for t in r.token_times:
                tokens[slot(t)] += per_chunk
        elif r.ok:
            tokens[slot(r.end)] += r.output_tokens
        (completed if r.ok else failed)[slot(r.end)] += 1
        # time-weighted requests in flight
        a, b = r.start - start, r.end - start
        for i in range(slot(r.start), slot(r.end) + 1):
            overlap = min(b, (i + 1) * width) - max(a, i * width)
            if overlap > 0:
                in_flight[i] += overlap / width
    return {
        "bin_s": width,
        "t": [round((i + 0.5) * width, 4) for i in range(n)],
        "output_tokens_per_s": [x / width for x in tokens],
        "completed_per_s": [x / width for x in completed],
        "failed_per_s": [x / width for x in failed],
        "in_flight": in_flight,
    }


def summarize(result: RunResult) -> dict:
    spec, records = result.spec, result.records
    ok = [r for r in records if r.ok]
    wall = result.wall_s
    out_tokens = sum(r.output_tokens for r in ok)
    errors = Counter(r.status for r in records if not r.ok)
    itl = [g for r in ok for g in r.itl]
    cold = [r.ttft for r in ok if r.cold and r.ttft is not None]
    warm = [r.ttft for r in ok if not r.cold and r.ttft is not None]
    per_model: dict[str, dict] = {}
    for r in records:
        entry = per_model.setdefault(r.model, {"requests": 0, "ok": 0, "output_tokens": 0})
        entry["requests"] += 1
        entry["ok"] += r.ok
        entry["output_tokens"] += r.output_tokens if r.ok else 0
    short = sum(1 for r in ok if spec.options.ignore_eos and r.output_tokens != r.max_tokens)
    error_examples = {}
    for r in records:
        if not r.ok and r.status not in error_examples:
            error_examples[r.status] = r.error
    return {
        "settings": spec.describe(),
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "errors_by_status": dict(sorted(errors.items())),
        "error_examples": error_examples,
        "short_outputs": short,  # ok answers with fewer or more tokens than asked (with ignore_eos)
        "duration_s": wall,
        "requests_per_s": len(ok) / wall,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall,
        "prompt_len_mean": sum(r.prompt_len for r in records) / len(records) if records else math.nan,
        "prompt_cache": prompt_cache(ok),
        "latency_ms": {
            "ttft": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
            "tpot": distribution_ms([r.tpot for r in ok if r.tpot is not None]),
            "itl": distribution_ms(itl),
            "e2e": distribution_ms([r.e2e for r in ok]),
        },
        "cold_ttft_ms": {"first_request_of_model": distribution_ms(cold), "other_requests": distribution_ms(warm)},
        "per_model": dict(sorted(per_model.items(), key=lambda kv: _natural_key(kv[0]))),
        "per_tenant": per_tenant(records, wall),
        "client_cpu_s": result.client_cpu_s,
        "client_cpu_share": result.client_cpu_s / wall,
        "stopped_early": result.stopped_early,
        "timeseries": time_series(records, wall),
    }


def prompt_cache(records: Sequence[RequestRecord]) -> dict:
    """The prompt tokens of answered requests as the server counted them, and those it reported found cached (None
    when it reports nothing)."""
    counted = [r for r in records if r.prompt_tokens is not None]
    reported = [r for r in counted if r.cached_tokens is not None]
    prompt, cached = sum(r.prompt_tokens for r in counted), sum(r.cached_tokens for r in reported)
    return {"prompt_tokens_mean": prompt / len(counted) if counted else None,
            "cached_tokens": cached if reported else None,
            "cached_share": cached / sum(r.prompt_tokens for r in reported) if reported else None}


def per_tenant(records: Sequence[RequestRecord], wall: float) -> dict:
    """Each tenant's requests, errors, tokens of its answered requests (prompt tokens count words without a
    tokenizer), service (prompt + 2 x output tokens, what fair scheduling shares out) and TTFT."""
    out = {}
    for name in sorted({r.tenant for r in records if r.tenant is not None}):
        mine = [r for r in records if r.tenant == name]
        ok = [r for r in mine if r.ok]
        prompt, output = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
        out[name] = {
            "requests": len(mine), "ok": len(ok),
            "errors_by_status": dict(sorted(Counter(r.status for r in mine if not r.ok).items())),
            "prompt_tokens": prompt, "output_tokens": output, "output_tokens_per_s": output / wall,
            "service": prompt + 2 * output,
            "ttft_ms": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        }
    return out


def format_report(report: dict) -> str:
    s = report["settings"]
    load = (f"rate {s['rate']}/s" + (f", at most {s['concurrency']} in flight" if s["concurrency"] else "")
            if s["rate"] else f"concurrency {s['concurrency']}" + (f", think {s['think']} s" if s["think"] else ""))
    lines = [
        (f"{s['url']}: {len(s['models'])} model(s), {s['distribution']}, {load}, prompts {s['prompt_len'][0]}-"
         f"{s['prompt_len'][1]} {'tokens' if s['prompts'] == 'token ids' else 'words'}"
         + (f" after a system prompt of {s['shared_prefix']} words per model (chat), " if s["shared_prefix"] else ", ")
         + f"max_tokens {'{}-{}'.format(*s['output_len']) if s['output_len'] else s['options']['max_tokens']}, "
         f"{'streamed' if s['options']['stream'] else 'not streamed'}"),
        f"requests {report['requests']}: ok {report['ok']}, failed {report['failed']}"
        + (f"  errors by status: {report['errors_by_status']}" if report["errors_by_status"] else "")
        + ("  (stopped by the time limit)" if report["stopped_early"] else ""),
        (f"duration {report['duration_s']:.2f} s   {report['requests_per_s']:.2f} requests/s   "
         f"{report['output_tokens_per_s']:.1f} output tokens/s   (load generator CPU {report['client_cpu_share']:.0%} "
         "of one core)"),
    ]
    cache = report["prompt_cache"]
    if cache["prompt_tokens_mean"] is not None:
        lines.append(f"prompt tokens (the server's count) mean {cache['prompt_tokens_mean']:.1f}" +
                     (f", found cached {cache['cached_share']:.1%}" if cache["cached_share"] is not None else ""))
    if report["short_outputs"]:
        lines.append(f"warning: {report['short_outputs']} answers did not have exactly max_tokens tokens")
    header = f"{'ms':<6}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}{'max':>10}"
    lines += ["", header]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")):
        d = report["latency_ms"][name]
        if d.get("count"):
            lines.append(f"{label:<6}" + "".join(f"{d[k]:>10.1f}" for k in ("p50", "p90", "p99", "mean", "max")))
    cold = report["cold_ttft_ms"]["first_request_of_model"]
    warm = report["cold_ttft_ms"]["other_requests"]
    if cold.get("count") and warm.get("count"):
        lines.append(f"TTFT of each model's first request (cold) p50 {cold['p50']:.1f} ms (n={cold['count']}), "
                     f"of the others p50 {warm['p50']:.1f} ms")
    for name, t in report["per_tenant"].items():
        ttft = f", TTFT p50 {t['ttft_ms']['p50']:.1f} ms" if t["ttft_ms"].get("count") else ""
        errors = f", errors {t['errors_by_status']}" if t["errors_by_status"] else ""
        lines.append(f"tenant {name}: {t['ok']}/{t['requests']} ok{errors}, {t['output_tokens_per_s']:.1f} output "
                     f"tokens/s{ttft}, service {t['service']} (prompt + 2 x output tokens)")
    for status, message in report["error_examples"].items():
        lines.append(f"  {status}: {message}")
    return "\n".join(lines)


def write_json(report: dict, result: RunResult, path: str | Path) -> None:
    records = [{k: v for k, v in asdict(r).items() if k != "token_times"}
               | {"itl_ms_max": max(r.itl) * 1000 if r.itl else None} for r in result.records]
    Path(path).write_text(json.dumps(_finite(report | {"records": records}), indent=1))


def _finite(value):
    """NaN and infinities as null: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ---- models, safety ----------------------------------------------------------------------------------------


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def adapters_in(directory: str | Path) -> list[str]:
    """Subfolders holding an adapter_config.json, in natural order (adapter-2 before adapter-10)."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--adapters-dir {directory}: not a directory")
    names = sorted((p.name for p in root.iterdir() if (p / "adapter_config.json").is_file()), key=_natural_key)
    if not names:
        raise ValueError(f"--adapters-dir {directory}: no subfolder with an adapter_config.json")
    return names


async def served_models(url: str, api_key: str | None = None) -> list[str]:
    """The ids GET /v1/models lists (for this key)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
            session.get(url.rstrip("/") + "/v1/models", headers=_auth(api_key)) as resp:
        resp.raise_for_status()
        return [m["id"] for m in (await resp.json())["data"]]


def check_loopback(url: str) -> None:
    """Refuse any URL whose host is not a loopback address (a load test must not hit someone else's server)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url must look like http://127.0.0.1:8000, not {url!r}")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"--url {url}: cannot resolve {parts.hostname}: {exc}") from None
    addresses = {info[4][0] for info in infos}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"--url {url} is not a loopback address ({', '.join(sorted(addresses))}); "
                         "pass --allow-remote to load a server on another machine")


# ---- the command -------------------------------------------------------------------------------------------


def add_loadtest_parser(commands) -> argparse.ArgumentParser:
    """Register `loradock loadtest` on the CLI's subparsers."""
    parser = commands.add_parser(
        "loadtest",
        help="load an OpenAI-compatible server (loradock, vLLM, ...) and report latency and throughput",
        description=__doc__.split("\n\n", 1)[0] + " Every run is bounded in requests and time.",
    )
    add_loadtest_arguments(parser)
    parser.set_defaults(handler=run_loadtest_command)
    return parser


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX like 16:64, not {text!r}") from None


def add_loadtest_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    which = target.add_mutually_exclusive_group()
    which.add_argument("--models", help="comma-separated model names to send requests to (base model or adapters)")
    which.add_argument("--adapters-dir", metavar="DIR", help="send to every adapter in DIR (its subfolder names)")
    target.add_argument("--api-key", help="bearer token, if the server wants one")
    target.add_argument("--tenant", action="append", type=parse_tenant, default=[],
                        metavar=TENANT_SYNTAX,
                        help="a tenant's stream of its own, at once with the others (repeatable; --requests and "
                        "--duration bound each; models default to what /v1/models lists for its key)")
    target.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    load = parser.add_argument_group("load (default: --concurrency 8 --requests 100)")
    load.add_argument("--distribution", default="uniform", help="uniform | zipf:ALPHA | distinct (round robin)")
    load.add_argument("--rate", type=float, help="Poisson arrivals, mean requests per second (open loop)")
    load.add_argument("--concurrency", type=int, help="requests in flight (closed loop; with --rate: a cap)")
    load.add_argument("--think", type=float, metavar="S",
                      help="closed loop: each client pauses a random time of mean S seconds between its requests")
    load.add_argument("--requests", type=int, help="stop after this many requests")
    load.add_argument("--duration", type=float, help="stop sending after this many seconds")
    load.add_argument("--warmup", type=int, default=0, help="unmeasured short requests first, round robin over models")
    load.add_argument("--shared-prefix", type=int, metavar="N",
                      help="chat requests: a system prompt of N random words per model (and tenant), then a user "
                      "turn of --prompt-len random words")
    load.add_argument("--time-limit", type=float, default=3600.0, help="hard limit on the whole run, s (default 3600)")
    req = parser.add_argument_group("requests")
    req.add_argument("--prompt-len", type=_range, default=(16, 64), help="prompt length MIN:MAX (default 16:64)")
    req.add_argument("--tokenizer", metavar="DIR", help="local HF tokenizer/model dir: prompts of random token ids "
                     "from its vocabulary (exact lengths); default: random words")
    req.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default 64)")
    req.add_argument("--output-len", type=_range, metavar="MIN:MAX",
                     help="tokens per answer, seeded uniform per request (instead of --max-tokens)")
    req.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="stream (default on)")
    req.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    req.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                     help="let answers end at EOS (default: ignore_eos, exactly --max-tokens tokens)")
    req.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, s (default 300)")
    req.add_argument("--seed", type=int, default=0, help="seed of the workload (default 0)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="results.json", help="write the report and per-request records as JSON")
    out.add_argument("--plot", metavar="results.png", help="write latency distributions and throughput over time")
    out.add_argument("--quiet", action="store_true", help="no progress bar")


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    if not args.allow_remote:
        check_loopback(args.url)
    if args.tenant and args.api_key:
        raise ValueError("--tenant gives each tenant's key: leave out --api-key")
    if args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    elif args.adapters_dir:
        models = adapters_in(args.adapters_dir)
    elif args.tenant:
        models = []
    else:
        models = asyncio.run(served_models(args.url, args.api_key))
    tenants = [replace(t, models=t.models or models or asyncio.run(served_models(args.url, t.api_key)))
               for t in args.tenant]
    models = models or list(dict.fromkeys(m for t in tenants for m in t.models))
    options = RequestOptions(max_tokens=args.max_tokens, stream=args.stream, temperature=args.temperature,
                             ignore_eos=args.ignore_eos, timeout=args.timeout)
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    return LoadSpec(
        url=args.url, models=models, distribution=args.distribution, rate=args.rate, concurrency=args.concurrency,
        requests=args.requests, duration=args.duration, prompt_len=args.prompt_len, seed=args.seed, options=options,
        ordinary_ids=ordinary_token_ids(args.tokenizer) if args.tokenizer else None, warmup=args.warmup,
        time_limit=args.time_limit, api_key=args.api_key, tenants=tenants, output_len=args.output_len,
        think=args.think, shared_prefix=args.shared_prefix,
    )


class Progress:
    """A tqdm bar over requests (or seconds of a duration-bound run), with the live token rate."""

    def __init__(self, spec: LoadSpec, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            total = spec.requests * len(spec.streams()) if spec.requests is not None else None
            self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True,
                            desc="loadtest", smoothing=0.1)
        self.tokens = self.failed = 0
        self.started = time.perf_counter()

    def __call__(self, record: RequestRecord) -> None:
        if self.bar is None:
            return
        self.tokens += record.output_tokens if record.ok else 0
        self.failed += not record.ok
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:.0f} tok/s, {self.failed} failed", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(spec: LoadSpec, out: str | None = None, plot: str | None = None, progress: bool = True) -> dict:
    """Run, report, write the files; returns the report."""
    bar = Progress(spec, progress)
    try:
        result = asyncio.run(run_load(spec, bar))
    finally:
        bar.close()
    report = result.report()
    if out:
        write_json(report, result, out)
    if plot:
        from .plot import plot_run

        plot_run(result.records, report, plot)
    return report


def run_loadtest_command(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    report = run(spec, args.out, args.plot, progress=not args.quiet)
    print(format_report(report))
    if args.out:
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.loadtest", description=__doc__.split("\n")[0])
    add_loadtest_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_loadtest_command(args)
    except ValueError as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
