"""Mixes of loaded adapters, computed as peft's `LoraModel.add_weighted_adapter` computes them (peft 0.22).

A mix is a new adapter, all of whose modules have the same scale: lora_alpha = r = its rank and no rsLoRA, so s = 1
(the sources' scales are folded into its weights). Per module, with source i's weight wᵢ and scale sᵢ (A: [r, in], B: [out, r]):

    linear       A = Σ √|wᵢsᵢ|·sign(wᵢsᵢ) · Aᵢ       B = Σ √|wᵢsᵢ| · Bᵢ           same rank r for every source
    ties         the same terms, each Aᵢ and Bᵢ pruned to its `density` largest magnitudes, summed only where they
                 agree with the elected sign, over how many agree
    dare_linear  linear with each Aᵢ, Bᵢ masked at random (kept with probability `density`) and divided by density
    dare_ties    dare's masks, then ties' sign election
    cat          A = [w₁s₁A₁; w₂s₂A₂; ...]             B = [B₁ B₂ ...]               rank Σ rᵢ
    svd          ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ, then its best rank-max(rᵢ) factors: B = U·diag(S), A = Vᴴ

in float32, in peft's order of operations, so the numbers are peft's. DARE's masks come from a generator seeded with
the recipe's seed, drawn in peft's order (modules in the base model's order, A's sources then B's): they equal peft's
when torch's global generator is seeded with that seed as its merge loop starts. peft's refusals are kept: one
source is always `linear`; linear, ties and dare want equal ranks; sources' target_modules must all be lists or all
regexes. Beyond peft, the sources must name one base model (base_model_name_or_path). The mix targets what the
first source's config targets with the sources' target_modules joined (its layer and exclude options apply); a
module it targets that no source adapts is refused, as peft fails there. DoRA sources are refused, as peft refuses
them; so are lora_bias sources (peft merges their biases; not served here yet).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .errors import AdapterError
from .peft_format import AdapterWeights, BaseModelInfo, LoraModuleWeights, module_bytes

METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties", "svd")
_PRUNED = ("ties", "dare_linear", "dare_ties")  # the methods that read `density`
_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties")


class MixError(AdapterError):
    """A recipe that cannot be mixed; `field` names the recipe's part at fault: adapters, method or density."""

    def __init__(self, message: str, code: str, field: str):
        super().__init__(message, code)
        self.field = field


@dataclass(frozen=True)
class MergeRecipe:
    """What a mix is made of: source adapters by name with their weights, the method, density and DARE's seed."""

    adapters: tuple[tuple[str, float], ...]
    method: str = "linear"
    density: float | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return {"adapters": [{"name": n, "weight": w} for n, w in self.adapters], "method": self.method,
                "density": self.density, "seed": self.seed}

    @classmethod
    def from_dict(cls, raw: dict) -> MergeRecipe:
        adapters = tuple((str(a["name"]), float(a["weight"])) for a in raw["adapters"])
        density = raw.get("density")
        return cls(adapters, str(raw.get("method", "linear")), None if density is None else float(density),
                   int(raw.get("seed", 0)))

    def digest(self, *identities: object) -> str:
        """A hex digest of the recipe and `identities` (what tells the sources' versions apart)."""
        text = json.dumps([self.to_dict(), *identities], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def check_recipe(recipe: MergeRecipe) -> None:
    """MixError unless the recipe itself (before its sources are looked at) can be mixed."""
    names = [name for name, _ in recipe.adapters]
    if not names:
        raise MixError("a mix needs at least one adapter", "empty_mix", "adapters")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise MixError(f"adapters are named twice in the mix: {', '.join(twice)}", "duplicate_adapter", "adapters")
    if not all(math.isfinite(weight) for _, weight in recipe.adapters):
        raise MixError("every adapter's weight must be a finite number", "bad_weight", "adapters")
    if recipe.method not in METHODS:
        raise MixError(f"unknown merge method {recipe.method!r}: one of {', '.join(METHODS)}", "bad_method", "method")
    if recipe.method in _PRUNED:
        if recipe.density is None:
            raise MixError(f"{recipe.method} needs a density in (0, 1]", "missing_density", "density")
        if not 0 <= recipe.density <= 1 or (recipe.method.startswith("dare") and recipe.density == 0):
            low = "(0" if recipe.method.startswith("dare") else "[0"
            raise MixError(f"density must lie in {low}, 1] for {recipe.method}, not {recipe.density}",
                           "bad_density", "density")
    elif recipe.density is not None:
        raise MixError(f"density applies to {', '.join(_PRUNED)}, not to {recipe.method}", "bad_density", "density")


def mix_adapters(name: str, recipe: MergeRecipe, sources: list[AdapterWeights], base: BaseModelInfo,
                 max_rank: int) -> AdapterWeights:
    """The mix of `sources` (the recipe's adapters, in its order) on `base`; MixError for what peft refuses or what
    the server could not serve (a rank above `max_rank`, non-finite values)."""
    check_recipe(recipe)
    method = "linear" if len(sources) == 1 else recipe.method  # as peft: one adapter is only ever scaled
    rank = _mix_rank(method, sources, max_rank)
    _check_sources(sources, base)
    first = sources[0].config
    generator = torch.Generator().manual_seed(recipe.seed)
    modules = {}
    for module in _mix_targets(sources, base):
        present = [i for i, source in enumerate(sources) if module in source.modules]
        parts = [sources[i].modules[module] for i in present]
        weights = [recipe.adapters[i][1] for i in present]
        A, B = _MIXERS[method](parts, weights, rank, method, recipe.density, generator)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise MixError(f"the mix of {module} holds non-finite values", "non_finite", "adapters")
        A, B = _padded(A, B, rank)
        modules[module] = LoraModuleWeights(A=A, B=B, rank=rank, scale=1.0)
    return AdapterWeights(
        name=name, path=Path(name), modules=modules, max_rank=rank,
        target_names=tuple(sorted({m.rsplit(".", 1)[-1] for m in modules})),
        nbytes=sum(module_bytes(m) for m in modules.values()), sha256=_sha256(modules),
        config=_mix_config(first, list(modules), rank),
    )


def _check_sources(sources: list[AdapterWeights], base: BaseModelInfo) -> None:
    """MixError for sources trained on different bases, DoRA sources (peft refuses them), lora_bias sources, or sources
    adapting an embedding or the output head (these two not mixed here)."""
    for source in sources:
        vocab = [module for module in source.modules if module in base.vocab_modules]
        if vocab:
            raise MixError(f"{source.name} adapts {vocab[0]}: adapters on the embeddings or the output head cannot be "
                           "mixed", "embedding_target", "adapters")
    bases = {source.config.get("base_model_name_or_path") for source in sources} - {None}
    if len(bases) > 1:
        raise MixError(f"the adapters were trained on different base models ({', '.join(sorted(bases))}): a mix "
                       "needs one base", "other_base", "adapters")
    for source in sources:
        if source.config.get("use_dora"):
            raise MixError(f"{source.name} is a DoRA adapter: mixes of DoRA adapters are not defined (peft's "
                           "add_weighted_adapter refuses them too)", "dora_mix", "adapters")
        if source.config.get("lora_bias"):
            raise MixError(f"{source.name} has lora_B biases: mixes of such adapters are not served yet",
                           "lora_bias_mix", "adapters")


def _config_rank(config: dict) -> int:
    """The largest rank a config gives a module (peft sizes a mix by it)."""
    return max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])


def _mix_rank(method: str, sources: list[AdapterWeights], max_rank: int) -> int:
    ranks = [_config_rank(source.config) for source in sources]
    if method in _SAME_RANK and len(set(ranks)) != 1:
        raise MixError(f"{method} needs adapters of one rank (peft's rule), not {ranks}: use cat or svd",
                       "rank_mismatch", "adapters")
    rank = sum(ranks) if method == "cat" else max(ranks)
    if rank > max_rank:
        raise MixError(f"the mix would have rank {rank}, above the server's --max-lora-rank {max_rank}",
                       "rank_too_large", "adapters")
    return rank


def _joined_targets(sources: list[AdapterWeights], base: BaseModelInfo) -> set[str] | str:
    """The sources' target_modules joined as peft joins them: a set's union, or regexes as alternatives."""
    targets = [source.config.get("target_modules") for source in sources]
    targets = [set(base.linear_modules) if t == "all-linear" else t for t in targets]  # peft expands it at load
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) for t in targets):
        raise MixError("the adapters' target_modules mix lists and regexes, which peft cannot join", "bad_targets",
                       "adapters")
    return set().union(*map(set, targets))


def _mix_targets(sources: list[AdapterWeights], base: BaseModelInfo) -> list[str]:
    """The modules peft's mix adapts, in the base model's order: what the first source's config selects with the
    joined targets; each must be adapted by some source."""
    from peft.tuners.tuners_utils import check_target_module_exists  # seconds to import: only when mixing

    first = sources[0].config
    config = SimpleNamespace(target_modules=_joined_targets(sources, base), target_parameters=None,
                             exclude_modules=first.get("exclude_modules"), modules_to_save=None,
                             layers_to_transform=first.get("layers_to_transform"),
                             layers_pattern=first.get("layers_pattern"))
    targeted = [module for module in base.linear_modules if check_target_module_exists(config, module)]
    orphans = [m for m in targeted if not any(m in source.modules for source in sources)]
    if orphans:
        raise MixError(f"the mix would target {orphans[0]} (the first adapter's layer options with the joined "
                       f"target_modules), which no adapter of it adapts: peft fails there", "bad_targets", "adapters")
    return targeted


# ---- the methods: (modules, weights, rank, method, density, generator) -> (A [k, in], B [out, k]) ---------------


def _halves(parts: list[LoraModuleWeights], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each source's weight folded with its scale, split between A (with the sign) and B: [n] float32 each."""
    folded = [w * part.scale for part, w in zip(parts, weights)]
    A = torch.tensor([math.sqrt(abs(f)) * (1 if f >= 0 else -1) for f in folded])
    B = torch.tensor([math.sqrt(abs(f)) for f in folded])
    return A, B


def _task_arithmetic(parts, weights, rank, method, density, generator):
    """linear, ties and the dare methods: A and B each merged from the sources' A and B."""
    if len({part.rank for part in parts}) != 1:
        raise MixError(f"the adapters' ranks differ in a module ({[p.rank for p in parts]}): peft cannot stack them",
                       "rank_mismatch", "adapters")
    weights_A, weights_B = _halves(parts, weights)
    A = _combine([part.A.float() for part in parts], weights_A, method, density, generator)  # [r, in]
    B = _combine([part.B.float() for part in parts], weights_B, method, density, generator)  # [out, r]
    return A, B


def _combine(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float | None,
             generator: torch.Generator) -> torch.Tensor:
    """Σ weights[i]·tensors[i] after the method's pruning; ties' methods sum only the values of the elected sign."""
    if method in _PRUNED and density < 1:  # peft prunes nothing from density 1 up
        keep = _magnitude_mask if method == "ties" else _random_mask
        tensors = [tensor * keep(tensor, density, generator) for tensor in tensors]
        if method != "ties":
            tensors = [tensor / density for tensor in tensors]  # DARE rescales what it keeps
    stacked = torch.stack(tensors)  # [n, ...]
    weighted = stacked * weights.view(-1, *(1,) * (stacked.dim() - 1))
    if method in ("ties", "dare_ties"):
        agree = stacked.sign() == torch.where(stacked.sum(dim=0) >= 0, 1, -1)  # the elected sign, by total mass
        return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)
    return weighted.sum(dim=0)


def _magnitude_mask(tensor: torch.Tensor, density: float, _generator) -> torch.Tensor:
    """1 at the int(density · numel) largest magnitudes, else 0."""
    mask = torch.zeros_like(tensor).reshape(-1)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
    return mask.reshape(tensor.shape)


def _random_mask(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """1 with probability `density`, drawn per value."""
    return torch.bernoulli(torch.full_like(tensor, density), generator=generator)


def _cat(parts, weights, rank, method, density, generator):
    """The sources' weighted A rows and B columns side by side."""
    A = torch.cat([part.A.float() * w * part.scale for part, w in zip(parts, weights)])  # [Σr, in]
    B = torch.cat([part.B.float() for part in parts], dim=1)  # [out, Σr]
    return A, B


def _svd(parts, weights, rank, method, density, generator):
    """The weighted sum of the sources' ΔW = s·B A, cut to its `rank` largest singular directions."""
    deltas = torch.stack([(part.B.float() @ part.A.float()) * part.scale for part in parts])  # [n, out, in]
    delta = (deltas * torch.tensor(weights).view(-1, 1, 1)).sum(dim=0)  # [out, in]
    if rank > min(delta.shape):
        raise MixError(f"svd's rank {rank} exceeds a module's size {list(delta.shape)}", "rank_too_large", "adapters")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
    return Vh[:rank, :], U[:, :rank] @ torch.diag(S[:rank])  # A [rank, in], B [out, rank]


def _padded(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [k, in] and B [out, k] zero-padded to `rank` (cat, or a module below the mix's rank): the zeros add nothing,
    and every module of the mix has its rank and scale."""
    if A.shape[0] == rank:
        return A, B
    padded_A, padded_B = A.new_zeros(rank, A.shape[1]), B.new_zeros(B.shape[0], rank)  # [rank, in], [out, rank]
    padded_A[: A.shape[0]], padded_B[:, : B.shape[1]] = A, B
    return padded_A, padded_B


_MIXERS = {"linear": _task_arithmetic, "ties": _task_arithmetic, "dare_linear": _task_arithmetic,
           "dare_ties": _task_arithmetic, "cat": _cat, "svd": _svd}


def _mix_config(first: dict, modules: list[str], rank: int) -> dict:
    """The mix's adapter_config.json: the first source's as peft's add_weighted_adapter replaces it, targeting the
    mix's modules by their full names."""
    return {**first, "r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "use_rslora": False,
            "target_modules": modules, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None}


def _sha256(modules: dict[str, LoraModuleWeights]) -> str:
    digest = hashlib.sha256()
    for name, module in modules.items():
        digest.update(name.encode())
        digest.update(module.A.numpy().tobytes())
        digest.update(module.B.numpy().tobytes())
    return digest.hexdigest()
