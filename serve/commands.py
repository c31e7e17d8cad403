"""`loradock generate` and `loradock serve`: their argument parsers and handlers (the `loradock` command module,
cli.py at the package root, adds them)."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import typing
from collections.abc import Callable

from .api.tool_parsers import TOOL_CALL_FORMATS
from .engine import Engine, EngineConfig, SamplingParams
from .engine.threads import use_serving_threads
from .models.source import BUILTIN_MODELS, served_model_name

MODELS_NOTE = "--model takes a local Hugging Face model directory or a built-in model: " + "; ".join(
    f"{name}: {about}" for name, about in BUILTIN_MODELS.items()
) + ". Nothing is ever downloaded."

DEMO_PROMPTS = (
    "The quick brown fox",
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "Once upon a time, in a small village,",
    "SELECT name FROM users WHERE",
    "Dear team, the release",
)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (name, type, choices, default and help from the field), plus --threads."""
    group = parser.add_argument_group("model and engine")
    for name, field in EngineConfig.model_fields.items():
        extra = field.json_schema_extra or {}
        flag = extra.get("flag", "--" + name.replace("_", "-"))
        default = "" if field.default is None else f" (default {field.default})"
        if field.annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=field.default,
                               help=field.description + default)
            continue
        parse, choices = _flag_type(field.annotation)
        group.add_argument(flag, dest=name, type=parse, choices=choices, default=field.default,
                           metavar=extra.get("metavar") or {int: "N", float: "F"}.get(parse),
                           help=field.description + default)
    group.add_argument("--threads", type=int, help="torch compute threads on the CPU (default: all cores but one, "
                       "left to the HTTP loop and the clients)")


def _flag_type(annotation) -> tuple[Callable[[str], object], list | None]:
    """How a flag's text becomes the field's value: (parser, choices) from the field's type."""
    if typing.get_origin(annotation) is typing.Literal:  # its arguments are the choices, not a union's members
        return str, list(typing.get_args(annotation))
    kinds = [kind for kind in typing.get_args(annotation) or (annotation,) if kind is not type(None)]
    kind = kinds[0]
    if typing.get_origin(kind) is typing.Literal:
        return str, list(typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return lambda text: [item.strip() for item in text.split(",") if item.strip()], None
    return kind, None


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's settings from the parsed flags."""
    return EngineConfig(**{name: getattr(args, name) for name in EngineConfig.model_fields})


def add_generate_parser(commands) -> None:
    generate = commands.add_parser(
        "generate",
        help="run prompts through the engine, all at once in one continuous batch, and print the completions",
        description="Run prompts through the engine concurrently and print each completion. " + MODELS_NOTE,
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


def add_serve_parser(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve the OpenAI-compatible API, the adapter admin API and metrics over HTTP",
        description="Serve the OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models), the "
        "adapter admin API (/v1/adapters), /health and /metrics. " + MODELS_NOTE,
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
    server.add_argument("--tenants", metavar="FILE.yaml",
                        help="API keys (stored hashed) of tenants: the adapters each may use, its weight in fair "
                        "scheduling, its limits per minute; reloaded on SIGHUP (instead of --api-key)")
    server.add_argument("--allow-adapter-paths", action="store_true",
                        help="let the admin API load adapters from outside --adapters")
    server.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish on SIGTERM (default 30)")
    server.add_argument("--tool-call-parser", choices=list(TOOL_CALL_FORMATS), default="hermes",
                        help="how the model writes tool calls, read from answers under tool_choice auto and forced "
                        "under required: hermes (<tool_call> JSON blocks: Hermes, Qwen; the default), llama3_json "
                        "(Llama 3.1+ JSON), mistral ([TOOL_CALLS] and a JSON array)")
    cluster = serve.add_argument_group("replicas (Ray Serve)")
    cluster.add_argument("--replicas", type=int, default=0, metavar="N",
                         help="serve from N engine replicas on Ray Serve, adapter requests routed to a replica "
                         "holding the adapter (default 0: this process alone)")
    cluster.add_argument("--ray-address", metavar="ADDR",
                         help="join this Ray cluster (e.g. auto, or ray://head:10001) instead of starting a local one")
    cluster.add_argument("--replica-cpus", type=float, default=1.0, metavar="F",
                         help="Ray CPUs each replica reserves; fractions share a core (default 1)")
    cluster.add_argument("--replica-gpus", type=float, metavar="F",
                         help="GPUs each replica reserves (default: 1 when CUDA is visible here, else 0)")
    cluster.add_argument("--max-ongoing-requests", type=int, metavar="N",
                         help="requests a replica takes before the router sends more of a hot adapter to other "
                         "replicas (default: --max-num-seqs)")
    serve.add_argument("--config", metavar="FILE.yaml", help="options as YAML (keys like max-gpu-adapters); flags win")
    serve.set_defaults(handler=run_serve)


def run_generate(args: argparse.Namespace) -> int:
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
    use_serving_threads(args.threads)
    with Engine.from_config(engine_config(args)) as engine:
        announce(engine)

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
    from .api.server import build_state, serve_until_signal
    from .api.state import ServerSettings

    if args.tenants is not None and args.api_key is not None:
        raise ValueError("--tenants and --api-key exclude each other: with tenants, their keys guard the user "
                         "endpoints")
    use_serving_threads(args.threads)
    settings = ServerSettings(
        served_model_name=args.served_model_name or served_model_name(args.model),
        allow_adapter_paths=args.allow_adapter_paths,
        max_queue=args.max_queue,
        api_key=args.api_key,
        admin_token=args.admin_token,
        drain_timeout=args.drain_timeout,
        tenants_file=args.tenants,
        tool_call_parser=args.tool_call_parser,
    )
    if args.replicas > 0:
        run_replicas(args, settings)
        return 0
    state = build_state(engine_config(args), settings)
    announce(state.engine)
    asyncio.run(serve_until_signal(state, args.host, args.port))
    return 0


def announce(engine: Engine) -> None:
    """The engine's start-up line: its compute dtype and why."""
    print(f"loradock: compute dtype {engine.dtype}", flush=True)


def run_replicas(args: argparse.Namespace, settings) -> None:
    import torch

    try:
        from .cluster import ClusterSettings, run_cluster
    except ModuleNotFoundError as error:
        if error.name != "ray" and not (error.name or "").startswith("ray."):
            raise
        raise ValueError("--replicas runs the engines on Ray Serve, which is not installed: "
                         "pip install 'loradock[cluster]'") from None

    gpus = args.replica_gpus if args.replica_gpus is not None else float(torch.cuda.is_available())
    cluster = ClusterSettings(
        replicas=args.replicas, ray_address=args.ray_address, replica_cpus=args.replica_cpus, replica_gpus=gpus,
        threads=args.threads or max(1, int(args.replica_cpus)), max_ongoing_requests=args.max_ongoing_requests,
    )
    run_cluster(engine_config(args), settings, cluster, args.host, args.port)
