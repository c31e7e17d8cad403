"""Adapters with random weights, written by peft itself: for benchmarks and tests, where what an adapter
computes matters (it must change the output) but what it learned does not."""

from __future__ import annotations

from pathlib import Path

import torch


def write_random_adapter(base_path: Path, out_dir: Path, seed: int, std: float = 0.15, **lora_config) -> Path:
    """peft wraps the base model with `LoraConfig(**lora_config)`; A and B get seeded random values (peft starts
    B at zero, which would make the adapter a no-op); peft's own save_pretrained writes the files.

    The base is built from its config on the meta device: only its module names and shapes matter here, so no
    weight is read (an 8B base costs nothing), and only the LoRA layers are given memory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_path, local_files_only=True)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora_config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                real = torch.randn(param.shape, generator=generator) * std
                module_name, _, param_name = name.rpartition(".")
                setattr(peft_model.get_submodule(module_name), param_name, torch.nn.Parameter(real, requires_grad=False))
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def write_bench_adapters(base_path: Path, out_root: Path, indices, rank: int) -> None:
    """The benchmarks' adapters: `adapter-{i}` for each i, rank `rank` on every linear module, alpha 2 * rank,
    std 0.02, seed i."""
    for i in indices:
        write_random_adapter(base_path, Path(out_root) / f"adapter-{i}", seed=i, std=0.02, r=rank,
                             lora_alpha=2 * rank, target_modules="all-linear")


def main(argv: list[str] | None = None) -> None:
    import argparse

    from ..serve.models.source import resolve_model_path

    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.random_adapters",
                                     description="Write the benchmarks' random adapters (adapter-0 .. adapter-N-1).")
    parser.add_argument("--model", help="local HF model directory or built-in name (default: SmolLM2-135M-Instruct; tiny-random: the toy)")
    parser.add_argument("--out", required=True, help="folder that gets one subfolder per adapter")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    write_bench_adapters(resolve_model_path(args.model), Path(args.out), range(args.count), args.rank)
    print(f"{args.count} adapters of rank {args.rank} in {args.out}")


if __name__ == "__main__":
    main()
