"""`loradock train`, `loradock eval` and `loradock demo`: their argument parsers and handlers (the `loradock` command
module, cli.py at the package root, adds them)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path

from .config import METHODS, SCHEDULERS, TrainConfig
from .metrics import METRICS

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}

TRAIN_DESCRIPTION = """\
Train a LoRA adapter (QLoRA: nf4 base, the default on CUDA) on JSONL rows {"prompt", "completion"} or
{"messages": [...]} and write it as a PEFT adapter that `loradock serve` and peft load unchanged, with
training_report.json and loss_curve.png beside it. Loss is on completion / assistant tokens and their end token
only; chat rows are rendered with the model's chat template exactly as /v1/chat/completions renders them.
--method dpo trains on preference rows {"prompt" | "messages", "chosen", "rejected"} with TRL's DPOTrainer.
After training, --eval-data rows are scored through an in-process server and --gate decides whether the adapter
is registered (exit status 1 when it fails).
Several GPUs (or CPU processes): `torchrun --nproc_per_node N -m loradock train ...` or, on GPUs,
`accelerate launch --multi_gpu --num_processes N -m loradock train ...`; --batch-size is per process."""


def add_train_parser(commands) -> None:
    parser = commands.add_parser("train", help="train a LoRA / QLoRA adapter that drops into the server",
                                 description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local HF model directory or built-in name (default: SmolLM2-135M-Instruct; "
                        "tiny-random: the toy)")
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
    method = parser.add_argument_group("method")
    method.add_argument("--method", choices=METHODS, default=_DEFAULTS["method"],
                        help='sft (default) or dpo: preference rows {"prompt" | "messages", "chosen", "rejected"}')
    method.add_argument("--beta", type=float, default=_DEFAULTS["beta"],
                        help="DPO's beta: how strongly the policy is held to the reference (default 0.1)")
    method.add_argument("--init-adapter", type=Path, metavar="DIR",
                        help="start from this PEFT adapter (e.g. an SFT one); its rank, alpha, dropout, targets and "
                        "DoRA replace --rank --alpha --dropout --targets --dora")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=_DEFAULTS["rank"], help="default 16")
    lora.add_argument("--alpha", type=float, default=_DEFAULTS["alpha"], help="default 32")
    lora.add_argument("--dropout", type=float, default=_DEFAULTS["dropout"], help="default 0.05")
    lora.add_argument("--targets", default=_DEFAULTS["targets"],
                      help="all-linear (default) or comma-separated layer names, e.g. q_proj,v_proj")
    lora.add_argument("--dora", action="store_true",
                      help="train a DoRA adapter (peft's use_dora: a magnitude per output row beside A and B); "
                      "slower to train, served in the same batches as plain LoRA")
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
    gate = parser.add_argument_group("evaluation and gate (after training, through an in-process server)")
    gate.add_argument("--eval-data", type=Path, metavar="FILE.jsonl",
                      help="held-out rows to score (as loradock eval: the last assistant message or the completion "
                      "is the reference)")
    gate.add_argument("--metric", choices=METRICS, default=_DEFAULTS["metric"], help="default exact")
    gate.add_argument("--pattern", metavar="REGEX", help="the regex metric's pattern for rows without their own")
    gate.add_argument("--eval-max-tokens", type=int, default=_DEFAULTS["eval_max_tokens"],
                      help="answer length when scoring (default 64)")
    gate.add_argument("--gate", metavar="CONDITIONS",
                      help="register only if every condition holds, e.g. 'score>=0.9,kl<=0.2': names score, score_lo "
                      "(the 95%% interval's low end), agreement, kl, ppl_ratio (forgetting against the base); ops "
                      ">= <= > <")
    hot = parser.add_argument_group("hot-load into a running server")
    hot.add_argument("--register", metavar="URL", help="when done, load the adapter into the server at URL")
    hot.add_argument("--admin-token", default=os.environ.get("LORADOCK_ADMIN_TOKEN"),
                     help="that server's admin token (or LORADOCK_ADMIN_TOKEN)")
    hot.add_argument("--name", help="the adapter's name there (default: the --output folder's name)")
    parser.add_argument("--config", metavar="FILE.yaml", help="options as YAML (keys like max-steps); flags win")
    parser.set_defaults(handler=run_train)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig for parsed `loradock train` arguments; refuses what cannot work before anything loads."""
    from ..adapters.directory import is_valid_name

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
    if (config.eval_data or config.gate) and not is_valid_name(config.output.name):
        raise ValueError(f"--eval-data and --gate serve the adapter under its folder's name, and "
                         f"{config.output.name!r} is not a valid adapter name (letters, digits, '.', '_', '-')")
    return config


def run_train(args: argparse.Namespace) -> int:
    from .evaluate import load_eval_rows
    from .register import RegisterError, register_adapter
    from .trainer import train

    config = train_config(args)
    rows = load_eval_rows(config.eval_data, config.metric, config.pattern) if config.eval_data else []
    result = train(config)
    if result.output is None:  # not the first process of a distributed run
        return 0
    report = result.report
    print(f"adapter written to {result.output} ({report['steps']} steps in {report['time']['train_seconds']:.1f} s)")
    if report["eval_before"]:
        print(_validation_line(report["eval_before"], report["eval_after"]))
    if (config.eval_data or config.gate) and not _evaluate_trained(config, result, rows):
        return 1
    if not config.register:
        return 0
    try:
        status, body = register_adapter(config.register, config.adapter_name, result.output, config.admin_token)
    except RegisterError as exc:
        print(f"loradock: error: {exc}", file=sys.stderr)
        return 1
    print(f"{config.register} answered {status}: {body}")
    return 0 if 200 <= status < 300 else 1


def _validation_line(before: dict, after: dict) -> str:
    if "perplexity" in before:
        return (f"validation loss {before['loss']:.4f} -> {after['loss']:.4f}, "
                f"perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}")
    return (f"held-out pairs: DPO loss {before['loss']:.4f} -> {after['loss']:.4f}, reward accuracy "
            f"{before['reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}, reward margin "
            f"{before['reward_margin']:.4f} -> {after['reward_margin']:.4f}, preference accuracy "
            f"{before['preference_accuracy']:.3f} -> {after['preference_accuracy']:.3f}")


def _evaluate_trained(config: TrainConfig, result, rows: list) -> bool:
    """Score the new adapter (and the gate's forgetting measures), add it all to its report, print it; whether the
    gate holds (True without a gate)."""
    from .evaluate import summary
    from .gate import failures, run_gate
    from .openai_client import ServerError
    from .report import add_to_report

    try:
        outcome = run_gate(config, result.output, Path(result.report["base_model"]["path"]), rows)
    except ServerError as exc:
        print(f"loradock: error: cannot evaluate the adapter: {exc}", file=sys.stderr)
        return False
    add_to_report(result.output, outcome)
    print("\n".join(summary(outcome["evaluation"])))
    gate = outcome["gate"]
    if gate is None:
        return True
    if gate["passed"]:
        print(f"gate passed: {config.gate}")
        return True
    not_registered = ", the adapter is not registered" if config.register else ""
    print(f"gate FAILED{not_registered}:\n  " + "\n  ".join(failures(gate)), file=sys.stderr)
    return False


EVAL_DESCRIPTION = """\
Score a model (usually an adapter) on held-out JSONL rows through any OpenAI-compatible server (loradock, vLLM):
{"prompt", "completion"} rows go to /v1/completions, {"messages": [...]} rows to /v1/chat/completions without their
last message, the assistant's reference answer. Greedy answers (temperature 0). Metrics: exact (stripped
equality), contains (the stripped reference occurs in the answer), regex (re.search of the row's "pattern" or
--pattern in the stripped answer; anchor with ^...$ for a full match), json-fields (the answer's first {...} JSON
object, field by field against the reference object). The score comes with a 95% interval: Wilson's for exact,
contains and regex; a seeded bootstrap over rows for json-fields (fields of one row are not independent).
--baseline runs a second model on the same rows: the difference with a paired bootstrap interval and a sign test.
--forgetting compares --model with --baseline (the base) on a general suite that ships with loradock: answer
agreement, mean per-token KL(model || base) on the base's greedy answers, and perplexity on a general English text;
the server must answer /v1/completions with "echo": true and "logprobs" (OpenAI's legacy scoring; vLLM does)."""


def add_eval_parser(commands) -> None:
    parser = commands.add_parser("eval", help="score a model or adapter through an OpenAI-compatible server: task "
                                 "score with a 95%% interval, a baseline beside it, forgetting",
                                 description=EVAL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the model to score: an adapter's name, or the base's")
    parser.add_argument("--data", type=Path, metavar="FILE.jsonl", help="held-out rows with reference answers")
    parser.add_argument("--metric", choices=METRICS, default="exact", help="default exact")
    parser.add_argument("--pattern", metavar="REGEX", help="the regex metric's pattern for rows without their own")
    parser.add_argument("--baseline", metavar="NAME", help="a second model on the same rows (usually the base)")
    parser.add_argument("--forgetting", action="store_true", help="measure forgetting against --baseline")
    parser.add_argument("--rows", type=Path, metavar="FILE.jsonl", help="write every row's answers and scores here")
    parser.add_argument("--out", type=Path, metavar="FILE.json", help="write the report here")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="the forgetting plot (default with --out: beside it, <out>.forgetting.png)")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length (default 64)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests at once (default 8)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="the server's API key (or OPENAI_API_KEY)")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default 0)")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalSettings, evaluate, load_eval_rows, summary
    from .forgetting import plot_forgetting
    from .openai_client import ServerError

    if args.data is None and not args.forgetting:
        raise ValueError("nothing to do: give --data FILE.jsonl, --forgetting, or both")
    if args.forgetting and not args.baseline:
        raise ValueError("--forgetting compares --model with the base model: name the base with --baseline")
    if args.max_tokens < 1 or args.concurrency < 1:
        raise ValueError("--max-tokens and --concurrency must be at least 1")
    rows = load_eval_rows(args.data, args.metric, args.pattern) if args.data else []
    settings = EvalSettings(url=args.url, model=args.model, baseline=args.baseline, metric=args.metric,
                            max_tokens=args.max_tokens, concurrency=args.concurrency, api_key=args.api_key,
                            forgetting=args.forgetting, seed=args.seed)
    try:
        report, records = asyncio.run(evaluate(rows, settings))
    except ServerError as exc:
        print(f"loradock: error: {exc}", file=sys.stderr)
        return 1
    report["data"] = str(args.data) if args.data else None
    print("\n".join(summary(report)))
    if args.rows:
        args.rows.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot = args.plot or (args.out.with_name(args.out.stem + ".forgetting.png") if args.out else None)
    if report["forgetting"] and plot:
        plot_forgetting(report["forgetting"], args.model, args.baseline, plot)
        print(f"forgetting plot: {plot}")
    return 0


def add_demo_parser(commands) -> None:
    parser = commands.add_parser(
        "demo", help="train small adapters on bundled tasks, serve them, and query them all at once",
        description="On the default model SmolLM2-135M-Instruct (built if needed): train one adapter per bundled "
        "task (a sentence to JSON, a review's sentiment in a fixed format, a sentence to a bulleted list) with the "
        "bundled trainer, start the server, send one mixed batch (every held-out prompt to the base model and every "
        "adapter, and general questions to each), print some answers and the table: every model's score on every "
        "task, and each adapter's agreement with the base on the general questions. Fails if an adapter scores "
        "under 90% on its own task.",
    )
    parser.add_argument("--work-dir", type=Path,
                        help="keep the task data, adapters, reports and answers here (default: a temporary folder, "
                        "removed)")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args.work_dir)
