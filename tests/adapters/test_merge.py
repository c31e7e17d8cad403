"""Mixes of adapters (`adapters/merge.py`) against peft's own `add_weighted_adapter`: every method's A and B equal
peft's, module by module (DARE's masks seeded alike), and what peft refuses is refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import LoraConfig
from peft_adapters import edit_config, write_adapter
from peft_mix import RECIPES as MIX_RECIPES
from peft_mix import peft_mix, write_sources

from loradock.adapters.merge import MergeRecipe, MixError, mix_adapters
from loradock.adapters.peft_format import BaseModelInfo, read_adapter
from loradock.loadtest.random_adapters import write_random_adapter
from loradock.serve.models.loader import load_model

RECIPES = {**MIX_RECIPES, "one_adapter": MergeRecipe((("c", 1.5),), "svd")}  # peft makes one adapter's mix linear


@pytest.fixture(scope="module")
def sources(model_dir, tmp_path_factory):
    return write_sources(model_dir("llama"), tmp_path_factory.mktemp("mix-sources"))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir("llama"), "none", torch.float32, torch.device("cpu"))[0]


@pytest.fixture(scope="module")
def base(model):
    return BaseModelInfo.from_model(model)


def ours(recipe: MergeRecipe, sources, base, model, max_rank: int = 64):
    weights = [read_adapter(sources / name, base, 64) for name, _ in recipe.adapters]
    return mix_adapters("mix", recipe, weights, base, max_rank)


@pytest.mark.parametrize("case", RECIPES)
def test_each_method_mixes_the_weights_peft_mixes(case, sources, base, model, model_dir):
    recipe = RECIPES[case]
    mine = ours(recipe, sources, base, model)
    theirs, scale = peft_mix(model_dir("llama"), sources, recipe)
    assert sorted(mine.modules) == sorted(theirs)
    for module, (A, B, magnitude) in theirs.items():
        got = mine.modules[module]
        assert got.scale == pytest.approx(scale)
        assert (got.magnitude is None) == (magnitude is None)
        if magnitude is not None:
            torch.testing.assert_close(got.magnitude, magnitude.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.A[: A.shape[0]], A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.B[:, : B.shape[1]], B, rtol=1e-6, atol=1e-7)
        assert not got.A[A.shape[0]:].any() and not got.B[:, B.shape[1]:].any()  # zero padding only


def test_dare_masks_follow_the_seed(sources, base, model):
    recipe = RECIPES["dare_linear"]
    again = ours(recipe, sources, base, model)
    other = ours(MergeRecipe(recipe.adapters, recipe.method, recipe.density, seed=4), sources, base, model)
    module = next(iter(again.modules))
    assert torch.equal(again.modules[module].A, ours(recipe, sources, base, model).modules[module].A)
    assert not torch.equal(again.modules[module].A, other.modules[module].A)


@pytest.mark.parametrize("recipe, code", [
    (MergeRecipe((("a", 1.0), ("c", 1.0)), "linear"), "rank_mismatch"),  # peft: the same r for linear
    (MergeRecipe((("a", 1.0), ("c", 1.0)), "cat"), "rank_too_large"),  # 4 + 8 above --max-lora-rank 8
    (MergeRecipe((("a", 1.0), ("b", 1.0)), "ties"), "missing_density"),
    (MergeRecipe((("a", 1.0), ("b", 1.0)), "dare_linear", density=0.0), "bad_density"),
    (MergeRecipe((("a", 1.0), ("b", 1.0)), "ties", density=1.5), "bad_density"),
    (MergeRecipe((("a", 1.0), ("a", 1.0)), "linear"), "duplicate_adapter"),
    (MergeRecipe((("a", float("inf")), ("b", 1.0)), "linear"), "bad_weight"),
    (MergeRecipe((), "linear"), "empty_mix"),
    (MergeRecipe((("a", 1.0), ("regex", 1.0)), "linear"), "bad_targets"),  # a list with a regex: peft refuses
])
def test_what_peft_refuses_is_refused(recipe, code, sources, base, model):
    with pytest.raises(MixError) as refused:
        ours(recipe, sources, base, model, max_rank=8)
    assert refused.value.code == code


@pytest.mark.parametrize("order", [("dora", "a"), ("a", "dora")])
def test_a_mix_with_a_dora_adapter_is_refused_as_peft_refuses_it(sources, base, model, model_dir, order):
    recipe = MergeRecipe(tuple((name, 0.5) for name in order))
    with pytest.raises(ValueError, match="DoRA"):
        peft_mix(model_dir("llama"), sources, recipe)
    with pytest.raises(MixError) as refused:
        ours(recipe, sources, base, model)
    assert refused.value.code == "dora_mix"


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_a_mix_of_an_adapter_on_the_embeddings_or_head_is_refused(sources, base, model, tmp_path, target):
    shutil.copytree(sources, tmp_path / "sources")
    write_adapter(model, tmp_path / "sources" / "vocab", LoraConfig(r=4, target_modules=["q_proj", target]))
    with pytest.raises(MixError, match=target) as refused:
        ours(MergeRecipe((("a", 1.0), ("vocab", 1.0))), tmp_path / "sources", base, model)
    assert refused.value.code == "embedding_target" and refused.value.field == "adapters"


def test_peft_refuses_the_mixes_refused_for_its_reasons(sources, model_dir):
    with pytest.raises(ValueError, match="same r value"):
        peft_mix(model_dir("llama"), sources, MergeRecipe((("a", 1.0), ("c", 1.0)), "linear"))
    with pytest.raises(ValueError, match="target modules type"):
        peft_mix(model_dir("llama"), sources, MergeRecipe((("a", 1.0), ("regex", 1.0)), "linear"))


def test_a_mix_with_a_lora_bias_adapter_is_refused(sources, base, model, model_dir, tmp_path):
    shutil.copytree(sources, tmp_path / "sources")
    write_random_adapter(model_dir("llama"), tmp_path / "sources" / "biased", seed=5, r=4, lora_alpha=8,
                         target_modules=["q_proj", "v_proj"], lora_bias=True)
    with pytest.raises(MixError) as refused:
        ours(MergeRecipe((("a", 0.5), ("biased", 0.5))), tmp_path / "sources", base, model)
    assert refused.value.code == "lora_bias_mix"
