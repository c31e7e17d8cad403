"""The `loradock` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path

import torch
import transformers
import yaml

from ..adapters.manager import UnknownAdapter
from .engine import Engine, EngineConfig, RequestError, SamplingParams
from .model_loader import DTYPES, ModelLoadError

DEMO_NOTE = (
    "No --model given: using the built-in demo model, a tiny randomly initialised Llama built on this machine "
    "so loradock runs offline. Its text is gibberish; it exists to try the system. For real output pass "
    "--model DIR, a local Hugging Face model directory (config.json, safetensors, tokenizer)."
)

DEMO_PROMPTS = (
    "The quick brown fox",
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "Once upon a time, in a small village,",
    "SELECT name FROM users WHERE",
    "Dear team, the release",
)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and engine")
    group.add_argument("--model", help="local HF model directory (default: the built-in demo model)")
    group.add_argument("--quantize", choices=["nf4", "int8", "none"], help="default: nf4 on CUDA, none on CPU")
    group.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    group.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    group.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens per engine step (default 2048)")
    group.add_argument("--max-num-seqs", type=int, default=256, help="requests running at once (default 256)")
    group.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    group.add_argument("--kv-cache-memory", help="KV cache budget, e.g. 2GiB (default: a share of free memory)")
    group.add_argument("--kv-cache-fraction", type=float, default=0.9, help="that share (default 0.9)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default 16)")
    group.add_argument(
        "--threads", type=int, help="torch compute threads on the CPU (default: all cores but one, which the HTTP "
        "loop and the clients need: two threads fighting a busy core stall every matrix multiply)"
    )
    lora = parser.add_argument_group("adapters")
    lora.add_argument("--adapters", metavar="DIR", help="folder of PEFT LoRA adapters, one per subfolder (its name)")
    lora.add_argument("--max-gpu-adapters", type=int, default=8, help="adapter slots on the device (default 8)")
    lora.add_argument("--max-cpu-adapters", type=int, default=32, help="adapters in the host cache (default 32)")
    lora.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted (default 64)")


def serving_threads() -> int:
    """torch compute threads when serving on the CPU: all usable cores but one, left to the HTTP loop and clients."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's settings from the flags; also sets torch's CPU threads (process-wide)."""
    torch.set_num_threads(args.threads or serving_threads())
    return EngineConfig(
        model=args.model,
        quantize=args.quantize,
        dtype=args.dtype,
        device=args.device,
        max_batch_tokens=args.max_batch_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_fraction=args.kv_cache_fraction,
        block_size=args.block_size,
        adapters_dir=args.adapters,
        max_gpu_adapters=args.max_gpu_adapters,
        max_cpu_adapters=args.max_cpu_adapters,
        max_lora_rank=args.max_lora_rank,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loradock", description="Serve many LoRA adapters on one quantized base model."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate",
        help="run prompts through the engine, all at once in one continuous batch, and print the completions",
        description="Run prompts through the engine concurrently and print each completion. " + DEMO_NOTE,
    )
    add_engine_arguments(generate)
    generate.add_argument("--prompt", action="append", help="a prompt (repeatable; default: a few demo prompts)")
    generate.add_argument(
        "--adapter", action="append", help="run every prompt through this adapter of --adapters (repeatable; "
        "'base' for the bare model; default: the bare model)"
    )
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    generate.add_argument("--ignore-eos", action="store_true")
    generate.set_defaults(handler=run_generate)

    serve = commands.add_parser(
        "serve",
        help="serve the OpenAI-compatible API, the adapter admin API and metrics over HTTP",
        description="Serve the OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models), the "
        "adapter admin API (/v1/adapters), /health and /metrics. " + DEMO_NOTE,
    )
    add_engine_arguments(serve)
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    server.add_argument("--served-model-name", help="the base model's name in the API (default: its folder name)")
    server.add_argument("--max-queue", type=int, default=1024, help="requests in flight before 429 (default 1024)")
    server.add_argument("--admin-token", default=os.environ.get("LORADOCK_ADMIN_TOKEN"),
                        help="bearer token for the admin API (or LORADOCK_ADMIN_TOKEN; without it the admin API is off)")
    server.add_argument("--api-key", help="bearer token required on the user endpoints (default: none)")
    server.add_argument("--allow-adapter-paths", action="store_true",
                        help="let the admin API load adapters from outside --adapters")
    server.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish on SIGTERM (default 30)")
    serve.add_argument("--config", metavar="FILE.yaml", help="options as YAML (keys like max-gpu-adapters); flags win")
    serve.set_defaults(handler=run_serve)
    # Subcommands that live with their packages (imported here: those modules use this one's helpers).
    from ..loadtest.loadtest import add_loadtest_parser
    from ..train.cli import add_demo_parser, add_train_parser

    add_train_parser(commands)
    add_demo_parser(commands)
    add_loadtest_parser(commands)
    return parser


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv; if it names --config, use that YAML as defaults and parse again so flags win."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    subparser = parser._subparsers._group_actions[0].choices[args.command]  # noqa: SLF001 - argparse has no API
    known = {a.dest for a in subparser._actions}  # noqa: SLF001
    try:
        with open(args.config, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"--config {args.config}: {exc}")
    if not isinstance(values, dict):
        parser.error(f"--config {args.config}: expected a mapping of option names to values")
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("config", "handler"):
            parser.error(f"--config {args.config}: unknown option {key!r}")
        defaults[dest] = value
    subparser.set_defaults(**defaults)
    return parser.parse_args(argv)


def run_generate(args: argparse.Namespace) -> int:
    if args.model is None:
        print(DEMO_NOTE, file=sys.stderr)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    adapters = [None if a == "base" else a for a in args.adapter or ["base"]]
    jobs = [(prompt, adapter) for prompt in args.prompt or DEMO_PROMPTS for adapter in adapters]
    with Engine.from_config(engine_config(args)) as engine:

        async def complete(prompt: str, adapter: str | None) -> tuple[str, str, int]:
            text, count, reason = [], 0, None
            async for output in engine.generate(prompt, params, adapter=adapter):
                text.append(output.text)
                count += 1
                reason = output.finish_reason
            return "".join(text), reason.value, count

        async def complete_all():
            return await asyncio.gather(*(complete(p, a) for p, a in jobs))

        started = time.perf_counter()
        results = asyncio.run(complete_all())
        elapsed = time.perf_counter() - started
    for (prompt, adapter), (text, reason, _count) in zip(jobs, results):
        print(f"--- prompt: {prompt!r}  [adapter: {adapter or 'base'}]\n{text!r}  [finish: {reason}]")
    tokens = sum(count for *_, count in results)
    print(f"\n{len(jobs)} requests, {tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.0f} tokens/s)")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from .api.app import serve
    from .api.state import ServerSettings, ServerState
    from .metrics import ServerMetrics

    if args.model is None:
        print(DEMO_NOTE, file=sys.stderr)
    metrics = ServerMetrics()
    engine = Engine.from_config(engine_config(args), metrics)
    metrics.watch(engine)
    settings = ServerSettings(
        served_model_name=args.served_model_name or (Path(args.model).name if args.model else "loradock-demo"),
        adapters_dir=Path(args.adapters) if args.adapters else None,
        allow_adapter_paths=args.allow_adapter_paths,
        max_queue=args.max_queue,
        api_key=args.api_key,
        admin_token=args.admin_token,
        drain_timeout=args.drain_timeout,
    )
    with engine:
        asyncio.run(serve(ServerState(engine, settings, metrics), args.host, args.port))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = apply_config_file(build_parser(), argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        transformers.utils.logging.disable_progress_bar()
    try:
        return args.handler(args)
    except (ModelLoadError, RequestError, UnknownAdapter, ValueError) as exc:
        print(f"loradock: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
