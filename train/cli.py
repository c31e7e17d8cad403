"""`loradock train` and `loradock demo`: their argument parsers and handlers (serve/cli.py adds them)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from .config import SCHEDULERS, TrainConfig

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}

TRAIN_DESCRIPTION = """\
Train a LoRA adapter (QLoRA: nf4 base, the default on CUDA) on JSONL rows {"prompt", "completion"} or
{"messages": [...]} and write it as a PEFT adapter that `loradock serve` and peft load unchanged, with
training_report.json and loss_curve.png beside it. Loss is on completion / assistant tokens and their end token
only; chat rows are rendered with the model's chat template exactly as /v1/chat/completions renders them.
Several GPUs (or CPU processes): `torchrun --nproc_per_node N -m loradock.serve.cli train ...` or, on GPUs,
`accelerate launch --multi_gpu --num_processes N -m loradock.serve.cli train ...`; --batch-size is per process."""


def add_train_parser(commands) -> None:
    parser = commands.add_parser("train", help="train a LoRA / QLoRA adapter that drops into the server",
                                 description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local HF model directory (default: the built-in demo model)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, metavar="FILE.jsonl", help="training rows (required)")
    data.add_argument("--output", type=Path, metavar="DIR", help="the adapter folder to write (required; must not exist)")
    held_out = data.add_mutually_exclusive_group()
    held_out.add_argument("--eval", type=Path, metavar="FILE.jsonl", help="validation rows")
    held_out.add_argument("--val-split", type=float, default=_DEFAULTS["val_split"],
                          help="without --eval, hold out this share of --data, chosen by --seed (default 0.1)")
    data.add_argument("--max-seq-len", type=int, default=_DEFAULTS["max_seq_len"],
                      help="rows with more tokens are left out, with a warning (default 1024)")
    data.add_argument("--packing", action="store_true",
                      help="concatenate each batch's rows into one row without padding (they never attend to each other)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=_DEFAULTS["rank"], help="default 16")
    lora.add_argument("--alpha", type=float, default=_DEFAULTS["alpha"], help="default 32")
    lora.add_argument("--dropout", type=float, default=_DEFAULTS["dropout"], help="default 0.05")
    lora.add_argument("--targets", default=_DEFAULTS["targets"],
                      help="all-linear (default) or comma-separated layer names, e.g. q_proj,v_proj")
    loop = parser.add_argument_group("training")
    loop.add_argument("--epochs", type=float, default=_DEFAULTS["epochs"], help="default 3")
    loop.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    loop.add_argument("--lr", type=float, default=_DEFAULTS["lr"], help="peak learning rate (default 2e-4)")
    loop.add_argument("--scheduler", choices=SCHEDULERS, default=_DEFAULTS["scheduler"], help="default cosine")
    loop.add_argument("--warmup", type=float, default=_DEFAULTS["warmup"],
                      help="warmup: a share of the steps below 1, a number of steps from 1 (default 0.03)")
    loop.add_argument("--batch-size", type=int, default=_DEFAULTS["batch_size"], help="rows per step and process (default 8)")
    loop.add_argument("--grad-accum", type=int, default=_DEFAULTS["grad_accum"], help="default 1")
    loop.add_argument("--quantize", choices=["nf4", "int8", "none"],
                      help="bitsandbytes quantization of the frozen base (default: nf4 on CUDA, none on CPU)")
    loop.add_argument("--gradient-checkpointing", action="store_true", help="less memory, about 30%% more time")
    loop.add_argument("--seed", type=int, default=_DEFAULTS["seed"], help="default 0")
    loop.add_argument("--eval-steps", type=int, help="evaluate and checkpoint every N steps (default: 10 times a run)")
    loop.add_argument("--early-stopping", type=int, metavar="N",
                      help="stop after N evaluations without a lower validation loss; keep the best")
    loop.add_argument("--checkpoint-dir", type=Path, help="default: <output>.checkpoints")
    loop.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                      help="continue from the latest checkpoint in --checkpoint-dir (or from CHECKPOINT)")
    hot = parser.add_argument_group("hot-load into a running server")
    hot.add_argument("--register", metavar="URL", help="when done, load the adapter into the server at URL")
    hot.add_argument("--admin-token", default=os.environ.get("LORADOCK_ADMIN_TOKEN"),
                     help="that server's admin token (or LORADOCK_ADMIN_TOKEN)")
    hot.add_argument("--name", help="the adapter's name there (default: the --output folder's name)")
    parser.add_argument("--config", metavar="FILE.yaml", help="options as YAML (keys like max-steps); flags win")
    parser.set_defaults(handler=run_train)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig for parsed `loradock train` arguments; refuses what cannot work before anything loads."""
    from ..adapters.manager import is_valid_name

    for required in ("data", "output"):
        if getattr(args, required) is None:
            raise ValueError(f"--{required} is required (as a flag or in --config)")
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"quiet"}
    config = TrainConfig(**{name: getattr(args, name) for name in names})
    if config.register:
        if not config.admin_token:
            raise ValueError("--register needs the server's admin token: --admin-token or LORADOCK_ADMIN_TOKEN")
        if not is_valid_name(config.adapter_name):
            raise ValueError(f"{config.adapter_name!r} is not a valid adapter name for the server: use --name "
                             f"(letters, digits, '.', '_', '-')")
    return config


def run_train(args: argparse.Namespace) -> int:
    from .register import RegisterError, register_adapter
    from .trainer import train

    config = train_config(args)
    result = train(config)
    if result.output is None:  # not the first process of a distributed run
        return 0
    report = result.report
    print(f"adapter written to {result.output} ({report['steps']} steps in {report['time']['train_seconds']:.1f} s)")
    if report["eval_before"]:
        before, after = report["eval_before"], report["eval_after"]
        print(f"validation loss {before['loss']:.4f} -> {after['loss']:.4f}, "
              f"perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}")
    if not config.register:
        return 0
    try:
        status, body = register_adapter(config.register, config.adapter_name, result.output, config.admin_token)
    except RegisterError as exc:
        print(f"loradock: error: {exc}", file=sys.stderr)
        return 1
    print(f"{config.register} answered {status}: {body}")
    return 0 if 200 <= status < 300 else 1


def add_demo_parser(commands) -> None:
    parser = commands.add_parser(
        "demo", help="train small adapters on bundled tasks, serve them, and query them all at once",
        description="Build the demo model if needed, train one adapter per bundled task with the bundled trainer, "
        "start the server, send one mixed batch to every adapter and the base model at once, print the answers "
        "and each adapter's exact-match score on held-out prompts. Fails if an adapter scores under 90%.",
    )
    parser.add_argument("--work-dir", type=Path,
                        help="keep the task data, adapters and reports here (default: a temporary folder, removed)")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args.work_dir)
