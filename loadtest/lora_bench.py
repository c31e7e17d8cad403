"""Multi-adapter throughput: loradock with 0, 1, 8, 32 distinct adapters in one running batch, next to PEFT.

Every request of a run names one of k adapters (round robin; k = 0: the bare base model). loradock serves them
from one continuous batch; PEFT, on the same model, the same adapters and the same prompts, serves them either
one request at a time after `set_adapter`, or in static batches with `generate(adapter_names=...)`.

    python -m loradock.loadtest.lora_bench --adapter-counts 0,1,8,32 --concurrency 32 --json lora.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from ..serve.engine.threads import use_serving_threads
from ..serve.engine import Engine, EngineConfig
from ..serve.models.dtype import choose_dtype
from ..serve.models.loader import default_quantize, load_model, resolve_device
from ..serve.models.source import resolve_model_path, served_model_name
from .engine_bench import _left_padded, make_prompts, run_engine
from .hardware import describe_hardware, format_hardware
from .random_adapters import write_bench_adapters

PEFT_BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.lora_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="local HF model directory or built-in name (default: SmolLM2-135M-Instruct; "
                        "tiny-random: the toy)")
    parser.add_argument("--adapter-counts", default="0,1,8,32", help="distinct adapters per run (default 0,1,8,32)")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank, all linear modules (default 16)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--requests", type=int, default=128, help="requests per run (default 128)")
    parser.add_argument("--prompt-len", default="16:64", help="prompt lengths MIN:MAX (default 16:64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--peft-sequential-requests", type=int, default=16, help="requests for PEFT one at a time")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT baselines")
    parser.add_argument("--quantize", choices=("nf4", "int8", "none"))
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, decode steps replayed from CUDA graphs (default on)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: as `loradock serve`, cores - 1)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    args.adapter_counts = [int(k) for k in args.adapter_counts.split(",")]
    low, _, high = args.prompt_len.partition(":")
    args.prompt_len = (int(low), int(high or low))
    return args


def adapter_names(count: int, requests: int) -> list[str | None]:
    """Request i uses adapter i % count; count 0: every request on the base model."""
    return [f"adapter-{i % count}" if count else None for i in range(requests)]


def peft_mixed(model, prompts, names, batch_size: int, max_tokens: int, pad_id: int) -> float:
    """PEFT's mixed-adapter batches: static batches of `batch_size`, adapter_names per row. Returns tok/s."""
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), batch_size):
        ids, mask = _left_padded(prompts[i : i + batch_size], pad_id, model.device)
        rows = [n or PEFT_BASE for n in names[i : i + batch_size]]
        out = model.generate(
            input_ids=ids, attention_mask=mask, adapter_names=rows, do_sample=False,
            max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=pad_id,
        )
        tokens += out[:, ids.shape[1] :].numel()
    return tokens / (time.perf_counter() - start)


def peft_sequential(model, prompts, names, max_tokens: int, pad_id: int) -> float:
    """PEFT one request at a time, `set_adapter` before each. Returns tok/s."""
    start, tokens = time.perf_counter(), 0
    for prompt, name in zip(prompts, names):
        ids = torch.tensor([prompt], device=model.device)
        if name is None:
            with model.disable_adapter():
                out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=max_tokens,
                                     min_new_tokens=max_tokens, pad_token_id=pad_id)
        else:
            model.set_adapter(name)
            out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, pad_token_id=pad_id)
        tokens += out.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    use_serving_threads(args.threads)  # the engine as it serves
    device = resolve_device(args.device)
    quantize = args.quantize or default_quantize(device)
    path = resolve_model_path(args.model)
    hardware = describe_hardware(device)
    print(format_hardware(hardware), flush=True)
    most = max(args.adapter_counts)
    print(
        f"model {path} (quantize {quantize}); {most} adapters of rank {args.rank} on all linear modules; "
        f"{args.requests} requests at concurrency {args.concurrency}, prompts {args.prompt_len[0]}-"
        f"{args.prompt_len[1]} tokens, {args.max_tokens} new tokens, greedy\n",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="loradock-bench-adapters-") as adapter_dir:
        write_bench_adapters(path, Path(adapter_dir), range(most), args.rank)
        results = run_loradock(args, path, quantize, device, adapter_dir)
        peft = {} if args.no_peft else run_peft(args, path, quantize, device, adapter_dir, results["prompts"])
    report(args, hardware, results["runs"], peft)


def run_loradock(args, path, quantize, device, adapter_dir) -> dict:
    engine = Engine.from_config(
        EngineConfig(
            model=str(path), quantize=quantize, device=str(device), adapters_dir=adapter_dir,
            max_gpu_adapters=max(max(args.adapter_counts), 1), max_lora_rank=args.rank,
            max_num_seqs=args.concurrency, max_model_len=args.prompt_len[1] + args.max_tokens,
            cuda_graphs=args.cuda_graphs,
        )
    )
    prompts = make_prompts(engine.tokenizer, engine.vocab_size, args.requests, args.prompt_len, args.seed)
    runs = {}
    with engine:
        for k in args.adapter_counts:
            run = run_engine(engine, prompts, args.concurrency, args.max_tokens, adapter_names(k, args.requests))
            runs[k] = run
            print(f"loradock {k:>3} adapters: {run.tokens_per_s:.1f} tok/s", file=sys.stderr, flush=True)
    del engine
    gc.collect()
    return {"runs": runs, "prompts": prompts}


def run_peft(args, path, quantize, device, adapter_dir, prompts) -> dict:
    from peft import PeftModel

    model, tokenizer = load_model(path, quantize, choose_dtype("auto", device).dtype, device)  # the engine's dtype
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    most = max(args.adapter_counts)
    if most == 0:
        return {}
    model = PeftModel.from_pretrained(model, Path(adapter_dir) / "adapter-0", adapter_name="adapter-0")
    for i in range(1, most):
        model.load_adapter(Path(adapter_dir) / f"adapter-{i}", adapter_name=f"adapter-{i}")
    model.eval()
    out = {"mixed": {}}
    with torch.inference_mode():
        peft_mixed(model, prompts[: args.concurrency], adapter_names(most, args.concurrency), args.concurrency, 4, pad_id)
        for k in args.adapter_counts:
            out["mixed"][k] = peft_mixed(
                model, prompts, adapter_names(k, args.requests), args.concurrency, args.max_tokens, pad_id
            )
            print(f"PEFT mixed {k:>3} adapters: {out['mixed'][k]:.1f} tok/s", file=sys.stderr, flush=True)
        n = args.peft_sequential_requests
        k = min(8, most)
        out["sequential"] = (k, peft_sequential(model, prompts[:n], adapter_names(k, n), args.max_tokens, pad_id))
    return out


def report(args, hardware, runs, peft) -> None:
    base = runs.get(0)
    header = f"{'adapters':>8} | {'loradock tok/s':>14} | {'vs base':>7} | {'PEFT mixed tok/s':>16} | {'loradock/PEFT':>13}"
    lines = [header, "-" * len(header)]
    for k, run in runs.items():
        mixed = peft.get("mixed", {}).get(k)
        lines.append(
            f"{k:>8} | {run.tokens_per_s:>14.1f} | "
            f"{(run.tokens_per_s / base.tokens_per_s if base else float('nan')):>7.2f} | "
            f"{(mixed or float('nan')):>16.1f} | {(run.tokens_per_s / mixed if mixed else float('nan')):>13.2f}"
        )
    print("\n".join(lines))
    if "sequential" in peft:
        k, rate = peft["sequential"]
        ours = runs.get(k)
        ratio = f"; loradock with {k} adapters is {ours.tokens_per_s / rate:.1f}x that" if ours else ""
        print(f"PEFT one request at a time (set_adapter, {k} adapters): {rate:.1f} tok/s{ratio}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "hardware": hardware,
                    "settings": {
                        "model": served_model_name(args.model), "quantize": args.quantize, "rank": args.rank,
                        "concurrency": args.concurrency, "requests": args.requests,
                        "prompt_len": list(args.prompt_len), "max_tokens": args.max_tokens,
                        "peft_sequential_requests": args.peft_sequential_requests,
                    },
                    "loradock": {k: r.tokens_per_s for k, r in runs.items()},
                    "peft_mixed": peft.get("mixed", {}),
                    "peft_sequential": peft.get("sequential"),
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
