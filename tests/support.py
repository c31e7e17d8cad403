"""Helpers the tests share: starting an engine on a local model, collecting a request, the HF reference."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from loradock.serve.engine import Engine, EngineConfig, SamplingParams
from loradock.serve.models.loader import load_model

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
CPU = torch.device("cpu")


def start_engine(path: Path, quantize: str = "none", device: torch.device = CPU, **config) -> Engine:
    model, tok = load_model(path, quantize, torch.float32, device)
    return Engine(model, tok, EngineConfig(**config), device).start()


async def collect(
    engine: Engine, prompt, params: SamplingParams, delay: float = 0.0, adapter: str | None = None
) -> tuple[list[int], str, str]:
    """Token ids, text and finish reason of one request, submitted after `delay` seconds."""
    await asyncio.sleep(delay)
    ids, text, reason = [], [], None
    async for output in engine.generate(prompt, params, adapter=adapter):
        if output.token_id is not None:
            ids.append(output.token_id)
        text.append(output.text)
        reason = output.finish_reason
    return ids, "".join(text), reason.value


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """HF generate, greedy, one request alone: the reference the engine must equal token for token."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    if not ignore_eos:
        config.eos_token_id = model.generation_config.eos_token_id
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids], device=model.device), generation_config=config)
    return out[0, len(prompt_ids) :].tolist()


def varied_prompts(tokenizer, count: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of different lengths (3 to 70 tokens) from seeded random ordinary token ids."""
    generator = torch.Generator().manual_seed(seed)
    specials = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in specials])
    lengths = torch.linspace(3, 70, count).round().int().tolist()
    return [
        [tokenizer.bos_token_id] + ordinary[torch.randint(len(ordinary), (n,), generator=generator)].tolist()
        for n in lengths
    ]


def peft_greedy(
    base_path: Path, adapter_dir: Path | None, prompts: list[list[int]], max_new_tokens: int,
    quantize: str = "none", ignore_eos: bool = False, device: torch.device = CPU,
) -> list[list[int]]:
    """PEFT's greedy output for each prompt alone: the oracle for an adapter (None: the bare base model)."""
    from peft import PeftModel

    model, _ = load_model(base_path, quantize, torch.float32, device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return [hf_greedy(model, p, max_new_tokens, ignore_eos) for p in prompts]


def unpacked_nf4(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its 4-bit weights kept out of bitsandbytes' CPU repacking (done on the first forward pass where
    the CPU has AVX512-BF16), after which peft's DoRA reads the repacked bytes as if they were not: the layout in which
    both loradock and peft dequantize them, as on CUDA."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
