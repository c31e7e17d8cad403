"""Adapters with random weights, written by peft itself: for benchmarks and tests, where what an adapter
computes matters (it must change the output) but what it learned does not."""

from __future__ import annotations

from pathlib import Path

import torch


def write_random_adapter(base_path: Path, out_dir: Path, seed: int, std: float = 0.15, **lora_config) -> Path:
    """peft wraps the base model with `LoraConfig(**lora_config)`; A and B (and lora_bias' bias) get seeded random
    values (peft starts B at zero, which would make the adapter a no-op); peft's own save_pretrained writes the files.
    A DoRA adapter's magnitude m is the row norm ‖W + s·B A‖ that peft starts it from, times 1 + std·noise: its
    scale g = m / ‖W + s·B A‖ stays near 1, as in a trained adapter.

    The base is built from its config on the meta device: only its module names and shapes matter here, so no
    weight is read (an 8B base costs nothing), and only the LoRA layers are given memory; DoRA's magnitudes need the
    base weights, and peft saves the base weights of a targeted embed_tokens or lm_head beside their LoRA, so for
    those the base is loaded for real (on the CPU, float32)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import EMBEDDING_LAYER_NAMES
    from transformers import AutoConfig, AutoModelForCausalLM

    targets = lora_config.get("target_modules") or ()
    vocab_targets = not isinstance(targets, str) and any(name in targets for name in EMBEDDING_LAYER_NAMES)
    if lora_config.get("use_dora") or vocab_targets:
        base = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True, dtype=torch.float32)
    else:
        config = AutoConfig.from_pretrained(base_path, local_files_only=True)
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora_config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name and "lora_magnitude_vector" not in name:
                real = torch.randn(param.shape, generator=generator) * std
                module_name, _, param_name = name.rpartition(".")
                parameter = torch.nn.Parameter(real, requires_grad=False)
                setattr(peft_model.get_submodule(module_name), param_name, parameter)
        for layer in peft_model.modules():
            for adapter, magnitude in getattr(layer, "lora_magnitude_vector", {}).items():
                delta = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight  # [out, in]
                norm = torch.linalg.norm(layer.get_base_layer().weight + layer.scaling[adapter] * delta, dim=1)  # [out]
                magnitude.weight = torch.nn.Parameter(norm * (1 + std * torch.randn(norm.shape, generator=generator)),
                                                      requires_grad=False)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def write_bench_adapters(base_path: Path, out_root: Path, indices, rank: int, dora: bool = False) -> None:
    """The benchmarks' adapters: `adapter-{i}` for each i, rank `rank` on every linear module, alpha 2 * rank,
    std 0.02, seed i; DoRA ones with `dora`."""
    for i in indices:
        write_random_adapter(base_path, Path(out_root) / f"adapter-{i}", seed=i, std=0.02, r=rank,
                             lora_alpha=2 * rank, target_modules="all-linear", use_dora=dora)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from ..serve.models.source import resolve_model_path

    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.random_adapters",
                                     description="Write the benchmarks' random adapters (adapter-0 .. adapter-N-1).")
    parser.add_argument("--model", help="local HF model directory or built-in name (default: SmolLM2-135M-Instruct; tiny-random: the toy)")
    parser.add_argument("--out", required=True, help="folder that gets one subfolder per adapter")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dora", action="store_true", help="DoRA adapters (with magnitude vectors)")
    args = parser.parse_args(argv)
    write_bench_adapters(resolve_model_path(args.model), Path(args.out), range(args.count), args.rank, args.dora)
    print(f"{args.count} {'DoRA' if args.dora else 'LoRA'} adapters of rank {args.rank} in {args.out}")


if __name__ == "__main__":
    main()
