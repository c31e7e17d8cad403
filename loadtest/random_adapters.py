"""Adapters with random weights, written by peft itself: for benchmarks and tests, where what an adapter
computes matters (it must change the output) but what it learned does not."""

from __future__ import annotations

from pathlib import Path

import torch


def write_random_adapter(base_path: Path, out_dir: Path, seed: int, std: float = 0.15, **lora_config) -> Path:
    """peft wraps the base model with `LoraConfig(**lora_config)`; A and B get seeded random values (peft starts
    B at zero, which would make the adapter a no-op); peft's own save_pretrained writes the files."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, local_files_only=True, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora_config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)
