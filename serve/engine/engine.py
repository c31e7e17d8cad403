"""The engine: one thread owns the model and the device; asyncio callers only send it commands.

    caller (asyncio)                      engine thread
    generate() ── AddRequest ──────────►  scheduler.add
               ◄── TokenEvent per step ─  schedule → model_runner.run → sample → finish checks
    (stream closed) ── Abort ──────────►  scheduler.remove (KV freed before the next step)

Text (detokenization, stop strings) is produced on the caller's side so the engine thread only runs the model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ...adapters.directory import check_name
from ...adapters.lora_attach import attach_lora_layers, slot_memory, slotted_modules
from ...adapters.lora_layer import LoraContext
from ...adapters.manager import AdapterManager, AdapterVersion, UnknownAdapter
from ...adapters.merge import MergeRecipe
from ...adapters.peft_format import AdapterError, BaseModelInfo
from ...adapters.registry_file import RegistryFile
from ...adapters.stats import BucketCounts
from ...adapters.store import open_adapters
from ...kernels.lora import LoraMeta, select_lora_backend
from ...kernels.cpu_build import helper_has_a_core
from ...kernels.packed_linear import pack_linears
from ...kernels.paged_decode import select_paged_decode
from ..models.dtype import DtypeChoice, choose_dtype
from ..models.loader import default_quantize, eos_ids, load_model, resolve_device
from ..models.source import resolve_model_path
from .config import DEFAULT_BATCH_TOKENS, EngineConfig
from .decode_inputs import DecodeInputs
from .errors import RequestError
from .forward_context import ForwardContext
from .fused_layers import fuse_decoder_layers
from .grammar import Grammars
from .graph_runner import CudaGraph, DecodeGraphs, EagerGraph, GraphFactory
from .detokenizer import IncrementalDetokenizer, StopMatch, StopStringMatcher
from .host_memory import pack_into_huge_pages
from .kv_cache import CacheShape, PagedKVCache, free_device_memory, parse_size
from .logits_processors import process_logits
from .model_runner import ModelRunner
from .request import FinishReason, Request, TokenEvent
from .sampling import Logprobs, SamplingParams, make_generator, sample, score_tokens
from .scheduler import Scheduler

log = logging.getLogger("loradock.engine")


class PromptTooLong(RequestError):
    """The prompt alone does not fit the context."""


class BiasOutsideVocabulary(RequestError):
    """logit_bias names a token id the model does not have."""


@dataclass(frozen=True)
class GenerationOutput:
    """One new token of a request, with the text it completes."""

    token_id: int | None
    text: str
    finish_reason: FinishReason | None = None
    logprobs: Logprobs | None = None  # when the request asked for them
    prompt_logprobs: tuple[Logprobs, ...] | None = None  # prompt tokens 1.., with the first token, when asked
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache, with the first token


@dataclass(frozen=True)
class _Add:
    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _AdapterRead:
    """A disk read of an adapter ended (from the reader pool)."""

    version: AdapterVersion


@dataclass(frozen=True)
class _Warm:
    """An adapter version read ahead of use: bring it into the host cache and a device slot."""

    version: AdapterVersion


@dataclass(frozen=True)
class _Retire:
    """An adapter version was unregistered or replaced: free it once idle."""

    version: AdapterVersion


class EngineShutdown(RuntimeError):
    """The engine stopped before the request finished."""


_STOP = object()
BATCH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        config: EngineConfig,
        device: torch.device,
        decode_graph: GraphFactory | None = None,
        dtype: DtypeChoice | None = None,
    ):
        """decode_graph: how decode steps replay from persistent inputs (`graph_runner`); default: CUDA graphs on CUDA
        (the same path eagerly with --no-cuda-graphs), none on the CPU. dtype: the model's compute dtype and why it
        was chosen (default: its weights' dtype, as loaded)."""
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        model_config = model.config
        self.max_model_len = min(
            config.max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings
        )
        self.vocab_size = model_config.vocab_size
        self.eos_token_ids = eos_ids(model, tokenizer)
        shape = CacheShape(
            num_layers=model_config.num_hidden_layers,
            num_kv_heads=model_config.num_key_value_heads,
            head_dim=getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads,
            dtype=next(p.dtype for p in model.parameters() if p.is_floating_point()),
        )
        self.dtype = dtype or DtypeChoice(shape.dtype, "the model as loaded")
        log.info("compute dtype %s", self.dtype)
        budget = (
            parse_size(config.kv_cache_memory)
            if config.kv_cache_memory is not None
            else int(free_device_memory(device) * config.kv_cache_fraction)
        )
        usable_blocks = config.max_num_seqs * -(-self.max_model_len // config.block_size)
        self.cache = PagedKVCache.from_budget(shape, budget, config.block_size, device, usable_blocks)
        if self.cache.capacity_tokens < self.max_model_len:
            log.warning("KV cache holds %d tokens: max_model_len lowered from %d", self.cache.capacity_tokens, self.max_model_len)
            self.max_model_len = self.cache.capacity_tokens
        log.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB), max_model_len %d",
            self.cache.num_blocks,
            config.block_size,
            self.cache.capacity_tokens * shape.bytes_per_token / 2**20,
            self.max_model_len,
        )
        self.grammars = Grammars(tokenizer, self.vocab_size, self.eos_token_ids, config.max_num_seqs, device,
                                 config.grammar_compile_timeout)
        self.max_batch_tokens = config.max_batch_tokens or DEFAULT_BATCH_TOKENS[device.type]
        self.scheduler = Scheduler(self.cache, self.max_batch_tokens, config.max_num_seqs, config.scheduling,
                                   config.prefix_caching)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self.adapters: AdapterManager | None = None
        base = BaseModelInfo.from_model(model)
        slotted = slotted_modules(base, config.lora_target_modules) if config.max_gpu_adapters > 0 else []
        decode_graph = decode_graph or default_decode_graph(device, config)
        head = base.head in slotted  # the output head's LoRA reads the logits rows' metadata
        decode_inputs = self._decode_inputs(head) if decode_graph is not None else None
        self.context = self._forward_context(decode_inputs, head)
        if config.max_gpu_adapters > 0:
            self.adapters = self._attach_adapters(model, base, slotted, config, shape.dtype)
        if device.type == "cpu":
            split = helper_has_a_core()  # the helper thread runs some of each GEMM's chunks
            log.info("linears packed for oneDNN: %d (%s)", pack_linears(model, config.max_num_seqs, split),
                     "in chunks shared with the helper thread" if split else "whole")
            log.info("weights on huge pages: %.1f MiB", pack_into_huge_pages(model) / 2**20)
            log.info("decoder layers on fused CPU ops: %d", fuse_decoder_layers(model))
        graphs = self._decode_graphs(model, decode_inputs, decode_graph) if decode_inputs is not None else None
        self.runner = ModelRunner(model, self.context, device, decode_graphs=graphs)
        if graphs is not None:
            started = time.perf_counter()
            graphs.capture()
            log.info("decode graphs for batch sizes %s captured in %.1f s", graphs.buckets, time.perf_counter() - started)
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._requests: dict[str, Request] = {}
        self._outbox: list = []  # (request, sink, event) waiting for the end of this iteration
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.batch_tokens = BucketCounts(BATCH_TOKEN_BUCKETS)  # tokens per step, read by the metrics collector

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        device = resolve_device(config.device)
        choice = choose_dtype(config.dtype, device)
        model, tokenizer = load_model(
            resolve_model_path(config.model), config.quantize or default_quantize(device), choice.dtype, device
        )
        return cls(model, tokenizer, config, device, dtype=choice)

    def _attach_adapters(self, model: torch.nn.Module, base: BaseModelInfo, slotted: list[str], config: EngineConfig,
                         dtype: torch.dtype) -> AdapterManager:
        """Wrap the modules adapters may target (`slotted`) in LoRA layers with preallocated slots, the backend chosen
        once; register the adapter directory's adapters."""
        backend = select_lora_backend(self.device)
        backend.prepare()
        lora, rows = LoraContext(backend, self.context.lora), LoraContext(backend, self.context.lora_rows)
        contexts = {name: rows if name == base.head else lora for name in slotted}
        layers = attach_lora_layers(model, contexts, config.max_gpu_adapters, config.max_lora_rank, dtype)
        memory = slot_memory(layers, base.vocab_modules)
        log.info("LoRA backend: %s; slot buffers %.1f MiB for %d slots of rank %d on %d layers (of which DoRA's and "
                 "lora_bias' output affine %.1f MiB, the embeddings' and output head's %.1f MiB)", backend.name,
                 memory.total / 2**20, config.max_gpu_adapters, config.max_lora_rank, len(layers),
                 memory.affine / 2**20, memory.vocab / 2**20)
        directory = open_adapters(config.adapters_dir) if config.adapters_dir is not None else None
        registry_file = RegistryFile(config.adapter_registry) if config.adapter_registry is not None else None
        manager = AdapterManager(
            layers,
            base,
            num_slots=config.max_gpu_adapters,
            max_cpu_adapters=config.max_cpu_adapters,
            max_rank=config.max_lora_rank,
            on_loaded=lambda version: self._commands.put(_AdapterRead(version)),
            directory=directory,
            registry_file=registry_file,
        )
        restored = manager.restore()  # first: what the admin unloaded from the directory stays unloaded
        if registry_file is not None:
            log.info("adapters from the registry %s: %s", registry_file.location, ", ".join(restored) or "none")
        found = manager.register_directory()
        if directory is not None:
            log.info("adapters in %s: %s", directory.root, ", ".join(found) or "none")
        return manager

    def _decode_inputs(self, head: bool) -> DecodeInputs:
        """The decode graphs' persistent inputs. Their packed buffer holds the LoRA metadata of every step, eager ones
        included (the logits rows' too when the output `head` has slots): sized for the larger of a step and a bucket
        (buckets pad up to max_num_seqs rows)."""
        config = self.config
        return DecodeInputs(config.max_num_seqs, self.cache, self.max_model_len, self.device,
                            select_paged_decode(self.device), num_slots=config.max_gpu_adapters,
                            lora_tokens=max(self.max_batch_tokens, config.max_num_seqs), lora_rows=head)

    def _forward_context(self, decode_inputs: DecodeInputs | None, head: bool) -> ForwardContext:
        """The one forward context of every step; its LoRA metadata (the tokens', and the logits rows' when the output
        `head` has slots) inside the decode inputs' buffer when given."""
        if decode_inputs is not None:
            return ForwardContext(self.cache, decode_inputs.lora_meta, decode_inputs.lora_rows)
        slots = self.config.max_gpu_adapters

        def meta() -> LoraMeta:
            return LoraMeta(self.max_batch_tokens, slots, self.device)

        return ForwardContext(self.cache, meta() if slots else None, meta() if slots and head else None)

    def _decode_graphs(self, model: torch.nn.Module, inputs: DecodeInputs, graph: GraphFactory) -> DecodeGraphs:
        pool = torch.cuda.graph_pool_handle() if graph is CudaGraph else None
        return DecodeGraphs(model, self.context, inputs, graph, pool)

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loradock-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the engine thread; requests still running end with an error event."""
        if self._thread is not None:
            self._commands.put(_STOP)
            self._thread.join()
            self._thread = None
        self.grammars.shutdown()
        if self.adapters is not None:
            self.adapters.shutdown()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- caller side -----------------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, self.vocab_size, prompt)

    def check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_fits(self.max_model_len, prompt_ids, params)
        check_logit_bias(self.vocab_size, params)

    def register_adapter(self, name: str, path: str | Path, replace: bool = False) -> None:
        """Make `name` usable by new requests (read from `path` on first use). With `replace`, requests in
        flight on the old version finish on it; new ones get the new one."""
        _version, old = self._require_adapters(name).register(name, path, replace=replace)
        if old is not None:
            self._commands.put(_Retire(old))

    async def load_adapter(self, name: str, path: str | Path | None, replace: bool = False,
                           version: int | None = None, recipe: MergeRecipe | None = None) -> AdapterVersion:
        """Read and validate the adapter now (off the engine thread), or mix it from registered adapters by `recipe`
        (then `path` is not used: the mix gets a folder of its own), register it (as `version`, default one more
        than the one it replaces), and warm it into the host cache and a device slot. Raises AdapterError (refused,
        or the name is taken and not `replace`)."""
        manager = self._require_adapters(name)
        check_name(name)
        if not replace and any(v.name == name for v in manager.registered()):
            raise AdapterError(f"an adapter named {name!r} is already registered", code="name_conflict")
        if recipe is not None:
            path = manager.mixes.folder(name)
        weights = await asyncio.wrap_future(manager.read(path, name, recipe))
        loaded, old = manager.register(name, path, replace=replace, weights=weights, version_number=version,
                                       recipe=recipe)
        if old is not None:
            self._commands.put(_Retire(old))
        self._commands.put(_Warm(loaded))
        return loaded

    async def mix_adapter(self, recipe: MergeRecipe) -> str:
        """The name of the per-request mix of `recipe` on its sources' current versions, built once (off the engine
        thread) and then kept in the host cache like any adapter. Raises AdapterError (MixError) if it cannot be
        mixed, UnknownAdapter with adapters disabled."""
        future, new = self._require_adapters("a mix").mixes.per_request(recipe)
        version = await asyncio.wrap_future(future)
        if new:
            self._commands.put(_Warm(version))
        return version.name

    def unregister_adapter(self, name: str) -> None:
        """New requests for `name` fail at once; requests in flight finish; its memory is freed after them."""
        self._commands.put(_Retire(self._require_adapters(name).unregister(name)))

    def resolve_adapter(self, name: str) -> AdapterVersion:
        return self._require_adapters(name).resolve(name)

    def _require_adapters(self, name: str) -> AdapterManager:
        if self.adapters is None:
            raise UnknownAdapter(name, "adapters are disabled (--max-gpu-adapters 0)")
        return self.adapters

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        client: str | None = None,
        weight: float = 1.0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[GenerationOutput]:
        """Submit a request (on the base model, or through the named adapter) and iterate over its tokens.
        Closing the iterator early cancels the request. `client` (default: the adapter's name, "" for the base
        model) and its `weight` are whose fair share the request's tokens count against. Cached prompt blocks are
        shared only between requests of the same model (the base, or one read of an adapter) and `cache_salt`.
        A guide (`params.guide`) is compiled first, off the event loop: GrammarError, a RequestError, if it cannot."""
        params = params or SamplingParams()
        if not weight > 0:
            raise RequestError(f"a client's weight must be positive, not {weight}")
        prompt_ids = self.tokenize(prompt)
        self.check_fits(prompt_ids, params)
        version = self.resolve_adapter(adapter) if adapter is not None else None
        if self._thread is None:
            raise RuntimeError("the engine is not started")
        # compiled off the event loop and the engine thread (a replica compiles on its own side)
        matcher = await self.grammars.matcher(params.guide) if params.guide is not None else None
        request = Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=prompt_ids,
            params=params,
            generator=make_generator(params, self.device),
            adapter=version,
            adapter_slot=None if version is not None else -1,
            client=client if client is not None else adapter or "",
            weight=weight,
            cache_salt=cache_salt,
            matcher=matcher,
        )
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._commands.put(_Add(request, asyncio.get_running_loop(), events))
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        # stop strings are looked for once min_tokens tokens are out (as vLLM): the engine bars stop ids till then
        stops = StopStringMatcher(params.stop)
        generated = 0
        finished = False
        try:
            while not finished:
                event = await events.get()
                if event.error is not None:
                    finished = True
                    raise event.error
                text = detokenizer.push(event.token_id) if event.token_id is not None else ""
                generated += event.token_id is not None
                match = stops.feed(text) if generated >= params.min_tokens else StopMatch(text, False)
                finish = FinishReason.STOP if match.stopped else event.finish_reason
                if match.stopped and event.finish_reason is None:
                    self._commands.put(_Abort(request.request_id))
                finished = finish is not None
                text = match.text + (stops.flush() if finished and not match.stopped else "")
                yield GenerationOutput(event.token_id, text, finish, event.logprobs, event.prompt_logprobs,
                                       event.cached_tokens)
        finally:
            if not finished:
                self._commands.put(_Abort(request.request_id))

    # ---- engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        idle = True
        # idle: commit a piece of KV memory for the requests to come, and wait for a command once none is left
        while self._drain_commands(block=idle and not self.cache.commit_ahead()):
            self._assign_adapter_slots()
            entries = self.scheduler.schedule()
            idle = not entries  # nothing can run until a command arrives (a request, an adapter read)
            if entries:
                try:
                    self._step(entries)
                except Exception as exc:  # a failed step fails its requests, never the engine
                    log.exception("engine step failed")
                    error = RuntimeError(f"the engine step failed: {type(exc).__name__}: {exc}")
                    for request, _ in entries:
                        self._finish(request, TokenEvent(None, error=error))
            self._flush()
        for request in list(self._requests.values()):
            self._finish(request, TokenEvent(None, error=EngineShutdown("the engine shut down")))
        self._flush()

    def _assign_adapter_slots(self) -> None:
        """Give waiting requests whose adapter is on the host a device slot, between steps."""
        for request in self.scheduler.waiting:
            if request.adapter_slot is None:
                request.adapter_slot = self.adapters.ensure_slot(request.adapter)

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands; block for one if idle. False once asked to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command is _STOP:
                return False
            if isinstance(command, _Add):
                request = command.request
                self._requests[request.request_id] = request
                self._sinks[request.request_id] = (command.loop, command.events)
                if request.adapter is not None:
                    self.adapters.pin(request.adapter)
                self.scheduler.add(request)
            elif isinstance(command, _Abort) and command.request_id in self._requests:
                self._finish(self._requests[command.request_id], TokenEvent(None, FinishReason.ABORT))
            elif isinstance(command, _AdapterRead):
                self._adapter_read(command.version)
            elif isinstance(command, _Retire):
                self.adapters.retire(command.version)
            elif isinstance(command, _Warm):
                self.adapters.warm(command.version)

    def _adapter_read(self, version: AdapterVersion) -> None:
        error = self.adapters.finish_loading(version)
        if error is not None:
            for request in [r for r in self.scheduler.waiting if r.adapter is version]:
                self._finish(request, TokenEvent(None, error=error))

    def _step(self, entries: list[tuple[Request, int]]) -> None:
        result = self.runner.run(entries)  # logits [N + P, vocab]: N sampled rows, then P prompt rows
        self.batch_tokens.observe(result.num_tokens)
        self.scheduler.advance(entries)
        sampled, logits = result.sampled, result.logits
        if result.prompt_rows:
            targets = [request.prompt_ids[position + 1] for request, position in result.prompt_rows]
            tops = [request.params.prompt_logprobs for request, _ in result.prompt_rows]
            for (request, _), logprobs in zip(result.prompt_rows, score_tokens(logits[len(sampled) :], targets, tops)):
                request.prompt_logprobs.append(logprobs)
        logits = logits[: len(sampled)]  # [N, vocab] the sampled rows; processed in place
        process_logits(logits, sampled, self.eos_token_ids)  # penalties, logit_bias, min_tokens
        self.grammars.mask(logits, sampled)  # structured outputs: tokens the request's grammar forbids to -inf
        tokens, logprobs = sample(logits, [r.params for r in sampled], [r.generator for r in sampled])
        self.grammars.advance(sampled, tokens)
        self.steps += 1
        for request, token, token_logprobs in zip(sampled, tokens, logprobs):
            first = not request.output_ids
            request.output_ids.append(token)
            reason = self._finish_reason(request, token)
            prompt_logprobs = tuple(request.prompt_logprobs) if first and request.params.prompt_logprobs is not None else None
            event = TokenEvent(token, reason, logprobs=token_logprobs, prompt_logprobs=prompt_logprobs,
                               cached_tokens=request.num_cached_tokens if first else None)
            if reason is None:
                self._emit(request, event)
            else:
                self._finish(request, event)

    def _finish_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            return FinishReason.STOP
        if request.matcher is not None and request.matcher.is_terminated():  # the grammar ended, even with ignore_eos
            return FinishReason.STOP
        if len(request.output_ids) >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, event: TokenEvent) -> None:
        self._emit(request, event)
        self._drop(request)

    def _drop(self, request: Request) -> None:
        """Forget a request: its KV blocks and its adapter pin are released before the next step."""
        if self._requests.pop(request.request_id, None) is None:
            return
        self.scheduler.remove(request)
        self._sinks.pop(request.request_id, None)
        if request.adapter is not None:
            self.adapters.unpin(request.adapter)

    def _emit(self, request: Request, event: TokenEvent) -> None:
        sink = self._sinks.get(request.request_id)
        if sink is not None:
            self._outbox.append((request, sink, event))

    def _flush(self) -> None:
        """Hand this iteration's events to their callers: one wake-up per event loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request, (loop, events), event in self._outbox:
            by_loop.setdefault(loop, []).append((request, events, event))
        self._outbox.clear()
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the caller's event loop is closed: nobody listens any more
                for request, _events, _event in batch:
                    self._drop(request)


def encode_prompt(tokenizer, vocab_size: int, prompt: str | list[int]) -> list[int]:
    """The prompt's token ids (text tokenized, ids checked against the vocabulary); RequestError if unusable."""
    ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise RequestError("the prompt is empty")
    if any(not (0 <= t < vocab_size) for t in ids):
        raise RequestError(f"prompt token ids must lie in [0, {vocab_size})")
    return ids


def check_logit_bias(vocab_size: int, params: SamplingParams) -> None:
    """BiasOutsideVocabulary if logit_bias names a token id outside the vocabulary."""
    outside = [token for token, _ in params.logit_bias if token >= vocab_size]
    if outside:
        raise BiasOutsideVocabulary(f"logit_bias token ids must lie in [0, {vocab_size}); got {outside[:5]}")


def check_fits(max_model_len: int, prompt_ids: list[int], params: SamplingParams) -> None:
    """PromptTooLong if the prompt alone fills the context; RequestError if max_tokens more do not fit."""
    if len(prompt_ids) >= max_model_len:
        raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; this model's context is {max_model_len} tokens")
    if len(prompt_ids) + params.max_tokens > max_model_len:
        raise RequestError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
            f"{max_model_len} tokens; lower max_tokens to at most {max_model_len - len(prompt_ids)}"
        )


def _deliver(batch: list) -> None:
    for _request, events, event in batch:
        events.put_nowait(event)


def default_decode_graph(device: torch.device, config: EngineConfig) -> GraphFactory | None:
    """CUDA graphs on CUDA (with --no-cuda-graphs, the same decode path run eagerly); none elsewhere: the CPU decodes
    through its compiled attention."""
    if device.type != "cuda":
        return None
    return CudaGraph if config.cuda_graphs else EagerGraph
