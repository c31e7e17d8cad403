"""The mix tests' sources and their oracle: peft's own `add_weighted_adapter` on the tiny llama.

peft draws DARE's masks from torch's global generator after the mix's new LoRA layers are initialised (which draws
from it too); the oracle seeds the generator with the recipe's seed right there, as loradock's mixes are defined.
"""

from __future__ import annotations

from pathlib import Path

import torch
from support import hf_greedy

from loradock.adapters.merge import MergeRecipe
from loradock.loadtest.random_adapters import write_random_adapter
from loradock.serve.models.loader import load_model

# Same rank for a and b (linear, ties, dare), another for c (cat, svd); scales and targets differ; a regex target.
SOURCES = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "b": dict(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"], use_rslora=True),
    "c": dict(r=8, lora_alpha=8, target_modules=["v_proj", "down_proj", "q_proj"]),
    "regex": dict(r=4, lora_alpha=8, target_modules=r".*\.k_proj"),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], use_dora=True),
}
# One recipe per method over SOURCES
RECIPES = {
    "linear": MergeRecipe((("a", 0.7), ("b", -0.4)), "linear"),
    "cat": MergeRecipe((("a", 0.7), ("c", 0.5)), "cat"),
    "ties": MergeRecipe((("a", 0.6), ("b", 0.9)), "ties", density=0.5),
    "dare_linear": MergeRecipe((("a", 0.7), ("b", 0.3)), "dare_linear", density=0.6, seed=3),
    "dare_ties": MergeRecipe((("b", 1.2), ("a", 0.5)), "dare_ties", density=0.4, seed=11),
    "svd": MergeRecipe((("c", 0.8), ("a", 0.6)), "svd"),
}


def write_sources(base_path: Path, root: Path) -> Path:
    """Each of SOURCES as a PEFT adapter folder under `root`, random weights seeded by its position."""
    for seed, (name, config) in enumerate(SOURCES.items(), start=20):
        write_random_adapter(base_path, root / name, seed=seed, **config)
    return root


def peft_model_with_mix(base_path: Path, sources: Path, recipe: MergeRecipe, name: str = "mix"):
    """The base with each source loaded by peft and the mix added by add_weighted_adapter, set active."""
    from peft import PeftModel

    model, _ = load_model(base_path, "none", torch.float32, torch.device("cpu"))
    (first, _), *rest = recipe.adapters
    model = PeftModel.from_pretrained(model, sources / first, adapter_name=first)
    for source, _ in rest:
        model.load_adapter(sources / source, adapter_name=source)
    lora = model.base_model
    inject = lora.inject_adapter

    def inject_then_seed(*args, **kwargs):
        inject(*args, **kwargs)
        torch.manual_seed(recipe.seed)

    lora.inject_adapter = inject_then_seed
    model.add_weighted_adapter([n for n, _ in recipe.adapters], [w for _, w in recipe.adapters], name,
                               combination_type=recipe.method, density=recipe.density)
    model.set_adapter(name)
    return model.eval()


def peft_mix(base_path: Path, sources: Path, recipe: MergeRecipe) -> tuple[dict, float]:
    """({module: (A [r, in], B [out, r], DoRA's magnitude [out] or None)}, scale) of peft's mix."""
    model = peft_model_with_mix(base_path, sources, recipe)
    prefix = "base_model.model."
    found, scale = {}, None
    for module_name, module in model.named_modules():
        if hasattr(module, "lora_A") and "mix" in module.lora_A:
            magnitude = module.lora_magnitude_vector["mix"].weight if "mix" in module.lora_magnitude_vector else None
            found[module_name.removeprefix(prefix)] = (module.lora_A["mix"].weight.detach(),
                                                       module.lora_B["mix"].weight.detach(), magnitude)
            scale = module.scaling["mix"]
    return found, scale


def peft_mix_greedy(base_path: Path, sources: Path, recipe: MergeRecipe, prompts: list[list[int]],
                    max_new_tokens: int) -> list[list[int]]:
    """peft's greedy output through its mix, each prompt alone."""
    model = peft_model_with_mix(base_path, sources, recipe)
    return [hf_greedy(model, prompt, max_new_tokens) for prompt in prompts]
