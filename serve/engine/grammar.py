"""Structured outputs with xgrammar: guides compiled off the event loop and the engine thread, and per step a token
bitmask for the guided rows.

    caller (asyncio)                         compile pool               engine thread
    generate() ── compile(guide) ──────────► GrammarCompiler (cached)
               ◄─ GrammarMatcher ─────────── (within the timeout)
               ── Request(matcher) ─────────────────────────────────►  mask: bitmask rows → logits rows to -inf
                                                                       sample → advance: matcher.accept_token

One tokenizer description per engine, as wide as the logits (the model's vocab_size, which may exceed the tokenizer's
length: a mask sized to the tokenizer leaves the padding ids unmasked, vLLM #15978 and #17746). A step with no guided
row does no work here. A guided request ends when its matcher accepts one of its stop tokens (the EOS ids), which
the grammar allows only once it is complete.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
import xgrammar as xgr

from ...adapters.stats import BucketCounts
from .errors import RequestError
from .guide import MAX_GUIDE_CHARS, Guide

if TYPE_CHECKING:
    from .request import Request

log = logging.getLogger("loradock.grammar")

CACHED_GRAMMARS = 128  # compiled grammars kept (least recently used dropped): a large one holds megabytes
COMPILE_WORKERS = 2  # guides compiled at once: a slow one leaves a worker for the others
COMPILE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30)  # seconds
MASK_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)  # seconds
# keywords whose values are schemas (in a map by name; one, or a list)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("items", "prefixItems", "additionalItems", "additionalProperties", "unevaluatedItems",
               "unevaluatedProperties", "contains", "propertyNames", "anyOf", "oneOf", "allOf", "not", "if", "then",
               "else")
_WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regular expression",
         "choice": "choice", "grammar": "grammar"}
# xgrammar's errors start with a time stamp, its source file and line, and sometimes the failed check
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


class GrammarError(RequestError):
    """A guide that cannot be used: not valid, does not compile, or took too long to compile."""


class Grammars:
    """Compiles guides for one tokenizer and masks the guided rows of each step's logits."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: frozenset[int], max_rows: int,
                 device: torch.device, compile_timeout: float):
        """vocab_size: the logits' width; max_rows: the most rows a step samples (max_num_seqs)."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.compile_timeout = compile_timeout
        self._pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="loradock-grammar")
        # Built on the first guide, in the pool: an engine that never sees one never pays for it (0.15 s on a
        # 49k vocabulary, more on larger ones).
        self._compiler: xgr.GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()
        self._compiled: OrderedDict[Guide, Future] = OrderedDict()  # running or done; failures kept (they recur)
        self._compiled_lock = threading.Lock()  # callers may run on several event loops (threads)
        words = xgr.get_bitmask_shape(max_rows, vocab_size)
        cuda = device.type == "cuda"
        self._bitmask = torch.empty(words, dtype=xgr.bitmask_dtype, pin_memory=cuda)  # [max_rows, ceil(vocab / 32)]
        self._device_bitmask = torch.empty(words, dtype=xgr.bitmask_dtype, device=device) if cuda else None
        # [ceil(vocab / 32)] the stop tokens' bits: a guided row short of its min_tokens whose grammar allows only these
        self._stop_bits = _bits(self.stop_token_ids, words[1])
        # half the cores: during the mask the engine thread waits for it, and torch's threads are idle
        self._filler = xgr.BatchGrammarMatcher("auto")
        # read by the metrics collector: each compile's time, and each masked step's (fill and apply)
        self.compile_seconds = BucketCounts(COMPILE_BUCKETS)
        self.mask_seconds = BucketCounts(MASK_BUCKETS)

    def shutdown(self) -> None:
        """Stop taking compiles; one already running finishes in the background (xgrammar cannot interrupt it)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- caller side ---------------------------------------------------------------------------------

    async def matcher(self, guide: Guide) -> xgr.GrammarMatcher:
        """A fresh matcher of the guide's compiled grammar (compiled once, then cached). GrammarError if the guide is
        invalid, fails to compile, or takes longer than the timeout to compile; a compile that times out runs on
        and is cached for the next request with the same guide."""
        if len(guide.spec) > MAX_GUIDE_CHARS:  # a Guide made without validation (model_construct, or unpickled)
            raise GrammarError(f"the {_WHAT[guide.kind]} has {len(guide.spec)} characters; at most {MAX_GUIDE_CHARS} "
                               "are accepted")
        future = self._compile_once(guide)
        try:
            # shielded: the compile is shared with other requests for the same guide and must outlive this wait
            compiled = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.compile_timeout)
        except TimeoutError:
            what = _WHAT[guide.kind]
            raise GrammarError(f"the {what} took longer than {self.compile_timeout:g} s to compile") from None
        return xgr.GrammarMatcher(compiled)

    def _compile_once(self, guide: Guide) -> Future:
        with self._compiled_lock:
            future = self._compiled.get(guide)
            if future is None:
                future = self._compiled[guide] = self._pool.submit(self._compile, guide)
                if len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(guide)
            return future

    # ---- compile pool --------------------------------------------------------------------------------

    def _compile(self, guide: Guide) -> xgr.CompiledGrammar:
        started = time.perf_counter()
        compiler = self._tokenizer_compiler()
        try:
            compiled = _compile_guide(compiler, guide)
        except RuntimeError as error:  # xgrammar's parse and conversion errors
            reason = _XGRAMMAR_PREFIX.sub("", str(error).strip())
            raise GrammarError(f"the {_WHAT[guide.kind]} does not compile: {reason}") from None
        seconds = time.perf_counter() - started
        self.compile_seconds.observe(seconds)
        log.debug("%s of %d characters compiled in %.3f s", _WHAT[guide.kind], len(guide.spec), seconds)
        return compiled

    def _tokenizer_compiler(self) -> xgr.GrammarCompiler:
        with self._compiler_lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                # Our own cache (by guide, bounded) replaces xgrammar's, which is unbounded by default; one thread
                # per compile, so compiles never take more than COMPILE_WORKERS cores from the engine.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    # ---- engine thread -------------------------------------------------------------------------------

    def mask(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """Set to -inf, in place, the logits [N, vocab] of the tokens each guided row's grammar forbids next.

        Applied to the logits after the forward pass: the decode graphs' outputs are rewritten, never their captured
        inputs or kernels, so the graphs stay valid."""
        rows = [i for i, request in enumerate(requests) if request.matcher is not None]
        if not rows:
            return
        assert logits.shape[-1] == self.vocab_size, "the mask must be as wide as the logits"
        started = time.perf_counter()
        bitmask = self._bitmask
        # Row i of the bitmask for row i of the logits, the rows filled by a few threads in one call. On CUDA the
        # previous step's copy out of this pinned buffer is done: that step's tokens reached the host after it.
        self._filler.batch_fill_next_token_bitmask([requests[i].matcher for i in rows], bitmask, rows)
        if self._device_bitmask is not None:
            self._device_bitmask[: rows[-1] + 1].copy_(bitmask[: rows[-1] + 1], non_blocking=True)
            bitmask = self._device_bitmask
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
        short = [i for i in rows if len(requests[i].output_ids) < requests[i].params.min_tokens]
        self._allow_the_end(logits, [i for i in short if requests[i].matcher.is_completed()])
        self.mask_seconds.observe(time.perf_counter() - started)  # on CUDA: the time to queue the kernels

    @torch.inference_mode()  # the model's logits are inference tensors: only written in place under inference mode
    def _allow_the_end(self, logits: torch.Tensor, rows: list[int]) -> None:
        """min_tokens bars the stop tokens; a grammar that allows nothing else ends the request there all the same:
        the grammar decides where a guided output ends. Those rows' stop tokens get logit 0, every other token being
        -inf (min_tokens still holds wherever the grammar can go on)."""
        ended = [i for i in rows if not (self._bitmask[i] & ~self._stop_bits).any()]
        if ended:
            device = logits.device
            logits[torch.tensor(ended, device=device)[:, None], torch.tensor(self.stop_token_ids, device=device)] = 0.0

    def advance(self, requests: list[Request], tokens: list[int]) -> None:
        """Each guided request's matcher takes its new token; one that takes a stop token terminates."""
        for request, token in zip(requests, tokens):
            if request.matcher is not None and not request.matcher.accept_token(token):
                # only if every token was -inf (a request's own stop_token_ids barred by min_tokens can do that)
                log.warning("request %s: token %d is outside its grammar", request.request_id, token)


def _compile_guide(compiler: xgr.GrammarCompiler, guide: Guide) -> xgr.CompiledGrammar:
    # Compact JSON (no free whitespace between tokens): with any whitespace allowed, small models fill the output
    # with newlines and spaces until max_tokens.
    if guide.kind == "json":
        schema = bounded_strings_as_patterns(_json(guide.spec, "the JSON schema"))
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    if guide.kind == "json_object":  # any object: xgrammar's builtin JSON grammar also allows arrays and whitespace
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
    if guide.kind == "regex":
        return compiler.compile_regex(guide.spec)
    if guide.kind == "choice":
        return compiler.compile_grammar(_choice_grammar(guide.spec))
    return compiler.compile_grammar(guide.spec)


def _json(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise GrammarError(f"{what} is not valid JSON: {error}") from None


def bounded_strings_as_patterns(schema):
    """The schema with each string bounded by minLength/maxLength (and no pattern) bounded by a pattern instead.

    xgrammar 0.2.9 compiles a length-bounded string to a character class that admits raw control characters, which
    JSON forbids (xgrammar #800: a random model writes them); its pattern path writes valid JSON strings. The same
    strings either way, but for escapes, which neither path writes."""
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    for keyword in _SCHEMA_MAPS:
        if isinstance(schema.get(keyword), dict):
            schema[keyword] = {name: bounded_strings_as_patterns(s) for name, s in schema[keyword].items()}
    for keyword in _SUBSCHEMAS:
        if isinstance(schema.get(keyword), list):
            schema[keyword] = [bounded_strings_as_patterns(s) for s in schema[keyword]]
        elif keyword in schema:
            schema[keyword] = bounded_strings_as_patterns(schema[keyword])
    types = schema.get("type") if isinstance(schema.get("type"), list) else [schema.get("type")]
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if ("string" in types and "pattern" not in schema and ("minLength" in schema or high is not None)
            and _count(low) and (high is None or _count(high) and low <= high)):
        schema.pop("minLength", None)
        schema.pop("maxLength", None)
        schema["pattern"] = f"^[\\s\\S]{{{low},{'' if high is None else high}}}$"
    return schema


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _choice_grammar(spec: str) -> str:
    """EBNF whose root is one of the strings: each a JSON string literal, whose escapes xgrammar's EBNF reads."""
    choices = _json(spec, "the choice")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarError("the choice must be a non-empty JSON array of strings")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _bits(token_ids: list[int], words: int) -> torch.Tensor:
    """[words] int32 with the bits of `token_ids` set, in xgrammar's layout (token t: word t // 32, bit t % 32)."""
    bits = [0] * words
    for token in token_ids:
        bits[token // 32] |= 1 << (token % 32)
    # as signed int32, the bitmask's dtype
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=xgr.bitmask_dtype)
