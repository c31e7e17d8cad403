"""The PEFT LoRA adapter format: read an adapter folder and validate it against the base model.

An adapter folder as ``PeftModel.save_pretrained`` writes it (peft 0.21; earlier versions write the same):

    adapter_config.json        the LoraConfig as JSON: peft_type, r, lora_alpha, target_modules, ...
    adapter_model.safetensors  for each adapted module, with the adapter's own name left out:
        base_model.model.<module>.lora_A.weight          [r, in_features]
        base_model.model.<module>.lora_B.weight          [out_features, r]
        base_model.model.<module>.lora_magnitude_vector  [out_features]   DoRA (use_dora) only
        base_model.model.<module>.lora_B.bias            [out_features]   lora_bias only
      where <module> is the module's name in the base causal LM, e.g. ``model.layers.0.self_attn.q_proj``.
      The output head (``lm_head``) is a linear like the others. An input embedding has instead
        base_model.model.<module>.lora_embedding_A      [r, num_embeddings]
        base_model.model.<module>.lora_embedding_B      [embedding_dim, r]
      and for a targeted embedding or head peft also saves the base module's own weight (save_embedding_layers
      "auto") as ``<module>.base_layer.weight``: its shape is checked, and it is not kept (LoRA training leaves it
      as the base has it). modules_to_save (a module's full trained weight) is refused.
    "all-linear" is expanded by peft before saving: target_modules holds the full names of every linear
    layer but the output head (or, from 20 names up, the shortest suffixes that pick exactly those).

``read_adapter`` reads the config with plain ``json`` and the weights with ``safetensors.deserialize`` (no
pickle, no peft model), refuses anything the server cannot serve exactly as peft would (``AdapterError``, codes
listed in ``errors.py``), and returns the weights as CPU tensors. Which modules the config targets, and each
module's rank and alpha, come from peft's own matching functions (``check_target_module_exists``,
``get_pattern_key``) applied to the parsed config.

The weights file is read into memory whole, once its size is checked against the largest adapter the base
model and the rank limit allow. So the hash and the tensors come from the same bytes, and there is no memory
map: a file rewritten in place while being read (save_pretrained truncates, then writes) gives an error, not a
SIGBUS that would kill the server. The cost is a transient second copy of the file while it is parsed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, deserialize
from torch import nn

from .errors import AdapterError

__all__ = ["AdapterError", "AdapterWeights", "BaseModelInfo", "LoraModuleWeights", "read_adapter"]

log = logging.getLogger("loradock.adapters")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

_KEY_PREFIX = "base_model.model."  # PeftModel.base_model (the LoraModel) .model (the causal LM)
# A module's tensors, by the suffix of their key: its part, and whether the part belongs to an input embedding (True),
# a linear (False), or either (None: the base weight peft saves beside an embedding's or the head's LoRA)
_PART_SUFFIXES = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
                  ".lora_magnitude_vector": ("magnitude", False), ".lora_B.bias": ("bias", False),
                  ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True),
                  ".base_layer.weight": ("base_copy", None)}
# The parts only some adapters have: the config flag that calls for each, its tensor's name, and the refusal's code
# when one comes without its flag (peft would silently drop it)
_OPTIONAL_PARTS = {
    "magnitude": ("use_dora", "lora_magnitude_vector", "dora"),
    "bias": ("lora_bias", "lora_B.bias", "bias"),
}
MAX_CONFIG_BYTES = 4 << 20  # a config listing every module of a large model is tens of kB
_HEADER_BYTES = 1 << 20  # room for the safetensors JSON header: 1 MiB, plus 1 kiB per targeted module
_HEADER_BYTES_PER_MODULE = 1 << 10
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}

# Config fields that switch on a LoRA variant or option the server does not implement. Each changes the forward
# pass or the model's structure, so serving such an adapter as plain LoRA would be silently wrong.
_UNSUPPORTED_FIELDS = {
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
}
# init_lora_weights values after which the adapter only fits a modified base: these initialisations rewrite the
# base weights (peft can convert such an adapter to plain LoRA when saving), and "mica" is a variant of its own.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")

# Model families recognisable in a hub id's last part, and the model_types each may be loaded as.
# Deliberately conservative: an id is refused only if it matches a family and no matching family allows the
# base's model_type; an id that matches no family passes.
_FAMILIES = (
    (re.compile(r"qwen3"), {"qwen3", "qwen3_moe"}),
    (re.compile(r"qwen(?!3)"), {"qwen", "qwen2", "qwen2_moe"}),  # Qwen1.5, Qwen2 and Qwen2.5 are all "qwen2"
    (re.compile(r"llama"), {"llama", "llama4"}),
    (re.compile(r"mixtral"), {"mixtral"}),
    (re.compile(r"mistral"), {"mistral", "mistral3"}),
    (re.compile(r"gemma"), {"gemma", "gemma2", "gemma3", "gemma3_text"}),
    (re.compile(r"(?<![a-z])phi"), {"phi", "phi3", "phimoe"}),  # not "dolphin"
    (re.compile(r"gpt2"), {"gpt2"}),
    (re.compile(r"falcon"), {"falcon"}),
)


@dataclass(frozen=True)
class BaseModelInfo:
    """What adapter validation needs to know about the base model; cheap to build, holds no tensors."""

    model_type: str
    # Every module LoRA may target, by its full name in model.named_modules(), in the model's order: each linear
    # layer and the output head as (in_features, out_features), each input embedding as (num_embeddings,
    # embedding_dim), the shapes of LoRA's A [r, first] and B [second, r] alike.
    modules: dict[str, tuple[int, int]]
    embeddings: frozenset[str]  # the nn.Embedding modules among them
    head: str | None  # the output head among them (a linear); None when it is not an nn.Linear

    @classmethod
    def from_model(cls, model: nn.Module) -> BaseModelInfo:
        """From a loaded HF causal LM, before any of its layers are wrapped. bitsandbytes' Linear4bit and
        Linear8bitLt subclass nn.Linear and keep in_features/out_features, so quantized models work too."""
        head = model.get_output_embeddings()
        modules, embeddings, head_name = {}, set(), None
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding):
                modules[name] = (module.num_embeddings, module.embedding_dim)
                embeddings.add(name)
            elif isinstance(module, nn.Linear):
                modules[name] = (module.in_features, module.out_features)
                head_name = name if module is head else head_name
        return cls(model.config.model_type, modules, frozenset(embeddings), head_name)

    @functools.cached_property
    def linear_modules(self) -> dict[str, tuple[int, int]]:
        """The linear layers but the output head, (in_features, out_features) by name: what peft's "all-linear"
        targets."""
        return {name: shape for name, shape in self.modules.items() if name not in self.vocab_modules}

    @functools.cached_property
    def vocab_modules(self) -> frozenset[str]:
        """The input embeddings and the output head: the modules sized by the vocabulary."""
        return self.embeddings | ({self.head} if self.head is not None else set())


@dataclass(frozen=True)
class LoraModuleWeights:
    """One adapted module: its output gains ``scale * B @ A @ x`` (plus ``scale * bias`` with lora_bias; DoRA rescales
    the whole output row, see ``dora.py``). Tensors on the CPU, in the file's dtype."""

    A: torch.Tensor  # [rank, in_features]; an embedding's lora_embedding_A [rank, num_embeddings]
    B: torch.Tensor  # [out_features, rank]; an embedding's lora_embedding_B [embedding_dim, rank]
    rank: int
    scale: float  # lora_alpha / rank, or lora_alpha / sqrt(rank) with use_rslora
    magnitude: torch.Tensor | None = None  # [out_features]: DoRA's lora_magnitude_vector m; None: not DoRA
    bias: torch.Tensor | None = None  # [out_features]: lora_B's bias (lora_bias); None: none
    # [out_features] float32: DoRA's m / ||W + scale·B A|| per output row, against the base: computed after reading,
    # where the base weights are (`dora.with_dora_scales`); None until then, and for a module that is not DoRA
    dora_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter on the host. Tensors keep the file's dtype (float16, bfloat16, float32 or float64):
    the caller converts them to the device's dtype."""

    name: str
    path: Path
    modules: dict[str, LoraModuleWeights]  # by full base module name, in the base model's module order
    max_rank: int  # the largest rank among the modules
    target_names: tuple[str, ...]  # sorted short names of the adapted modules, e.g. ("q_proj", "v_proj")
    nbytes: int  # bytes of all the modules' tensors
    sha256: str  # hex digest of the safetensors file's bytes
    config: dict  # adapter_config.json as parsed


@dataclass(frozen=True)
class _LoraConfig:
    """The fields of a LoRA adapter_config.json that decide targets, ranks and scales, with their types checked."""

    r: int
    alpha: float
    use_rslora: bool
    use_dora: bool  # each module has a lora_magnitude_vector
    lora_bias: bool  # each module's lora_B has a bias
    target_modules: str | tuple[str, ...]  # a regex (or "all-linear"), or names and name suffixes
    exclude_modules: str | tuple[str, ...]  # the same two forms; empty: nothing excluded
    layers_to_transform: frozenset[int] | None
    layers_pattern: tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]


def read_adapter(path: Path, base: BaseModelInfo, max_rank: int = 64, name: str | None = None) -> AdapterWeights:
    """Read and validate the PEFT LoRA adapter in folder `path` for the base model `base`.

    Every module's rank must be at most `max_rank` (the server's --max-lora-rank). `name` defaults to the
    folder's name. Raises AdapterError, whose message starts with the adapter's name, for anything wrong.
    """
    path = Path(path)
    name = path.name if name is None else name
    try:
        return _read(path, base, max_rank, name)
    except AdapterError as error:
        raise AdapterError(f"adapter {name!r}: {error}", error.code) from None


def weights_size_limit(raw: dict, base: BaseModelInfo, max_rank: int) -> int:
    """The most bytes a valid adapter_model.safetensors for config `raw` can hold on `base` within `max_rank`;
    AdapterError if the config itself is refused. (The object store checks this before downloading the file.)"""
    return _plan(raw, base, max_rank)[2]


def _plan(raw: dict, base: BaseModelInfo, max_rank: int) -> tuple[_LoraConfig, list[str], int]:
    """The parsed config, the base modules it targets, and the weights file's size limit."""
    config = _parse_config(raw)
    _check_architecture(raw.get("base_model_name_or_path"), base.model_type)
    targeted = _targeted_modules(config, raw, base)
    # No valid file is larger: each module's pair is at most max_rank * (in + out) float64 values, its magnitude
    # vector or bias out more, an embedding's or the head's base weight in * out more.
    vectors = config.use_dora + config.lora_bias
    most = sum((max_rank * (i + o) + vectors * o + (m in base.vocab_modules) * i * o) * 8 + _HEADER_BYTES_PER_MODULE
               for m, (i, o) in ((m, base.modules[m]) for m in targeted))
    return config, targeted, _HEADER_BYTES + most


def _read(path: Path, base: BaseModelInfo, max_rank: int, name: str) -> AdapterWeights:
    raw = read_config_file(path)
    config, targeted, limit = _plan(raw, base, max_rank)
    data = _read_weights_file(path, limit)
    sha256 = hashlib.sha256(data).hexdigest()
    tensors = _deserialize(data)
    del data  # the tensors' bytes are copies

    bound = _bind_tensors(tensors, base, targeted)
    modules = {}
    for module in targeted:  # the base model's order
        keys = _check_parts(module, bound.get(module), config)
        modules[module] = _module_weights(tensors, module, keys, config, base, max_rank)
    return AdapterWeights(
        name=name,
        path=path,
        modules=modules,
        max_rank=max(m.rank for m in modules.values()),
        target_names=tuple(sorted({module.rsplit(".", 1)[-1] for module in modules})),
        nbytes=sum(module_bytes(m) for m in modules.values()),
        sha256=sha256,
        config=raw,
    )


def module_bytes(module: LoraModuleWeights) -> int:
    """Bytes of one module's tensors."""
    tensors = (module.A, module.B, module.magnitude, module.bias, module.dora_scale)
    return sum(tensor.nbytes for tensor in tensors if tensor is not None)


# ---- files ---------------------------------------------------------------------------------------------------


def read_config_file(path: Path) -> dict:
    """adapter_config.json of the adapter folder `path` as a JSON object, at most 4 MiB read."""
    if not path.is_dir():
        raise AdapterError(f"{path} is not a directory (an adapter is a folder holding {CONFIG_FILE})", "missing_file")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{path} has no {CONFIG_FILE}: it is not a PEFT adapter folder", "missing_file")
    try:
        with config_path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise AdapterError(f"cannot read {CONFIG_FILE}: {error}", "missing_file") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES >> 20} MiB", "bad_config")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {error}", "bad_config") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object, not {type(raw).__name__}", "bad_config")
    return raw


def _read_weights_file(path: Path, limit: int) -> bytes:
    """The safetensors file's bytes, once its size is plausible and its declared header size fits in it."""
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_FILE).is_file():
            raise AdapterError(
                f"only {PICKLE_FILE} is present: loradock reads safetensors only and never unpickles a file, which "
                f"could run arbitrary code. Convert it where you trust it: load the adapter with peft and "
                f"save_pretrained(dir) again (safetensors is peft's default), or save the state dict with "
                f"safetensors.torch.save_file to {WEIGHTS_FILE}",
                "pickle_weights",
            )
        raise AdapterError(f"{path} has no {WEIGHTS_FILE}", "missing_file")
    try:
        with weights.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise AdapterError(
                    f"{WEIGHTS_FILE} is {size} bytes, more than any adapter with this config can be on this base "
                    f"model within the rank limit ({limit} bytes): is it a merged model, or another model's adapter?",
                    "too_large",
                )
            data = handle.read(limit + 1)
    except OSError as error:
        raise AdapterError(f"cannot read {WEIGHTS_FILE}: {error}", "missing_file") from None
    header = int.from_bytes(data[:8], "little")
    if len(data) < 8 or header > len(data) - 8:
        raise AdapterError(
            f"{WEIGHTS_FILE} is truncated or corrupt: it holds {len(data)} bytes, too few for "
            f"{'the 8-byte header size' if len(data) < 8 else f'the {header}-byte header it declares'}",
            "corrupt_file",
        )
    return data


def _deserialize(data: bytes) -> dict[str, dict]:
    """{tensor name: {"dtype": "F32", "shape": [...], "data": bytearray}}, every offset checked by safetensors."""
    try:
        return dict(deserialize(data))
    except SafetensorError as error:
        raise AdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {error}", "corrupt_file") from None


# ---- the config ----------------------------------------------------------------------------------------------


def _parse_config(raw: dict) -> _LoraConfig:
    """Refuse what the server cannot serve, check the types of the fields it uses, return those fields."""
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"peft_type is {raw.get('peft_type')!r}: only LoRA adapters can be served", "not_lora")
    if _flag(raw, "use_dora") and _flag(raw, "lora_bias"):
        raise AdapterError("use_dora and lora_bias are both true: peft refuses DoRA with a lora_B bias", "bad_config")
    if raw.get("modules_to_save"):
        raise AdapterError(
            f"modules_to_save is {raw['modules_to_save']!r}: the adapter replaces whole base modules, which "
            f"cannot be switched per request; only lora_A/lora_B weights are supported",
            "modules_to_save",
        )
    if (raw.get("bias") or "none") != "none":
        raise AdapterError(
            f"bias is {raw['bias']!r}: adapters that train the base model's biases are not supported (lora_bias, a "
            f"bias on lora_B, is)",
            "bias",
        )
    for field, feature in _UNSUPPORTED_FIELDS.items():
        if raw.get(field):
            raise AdapterError(f"{field} is set: {feature} is not supported, only plain LoRA", "unsupported_feature")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(
            f"init_lora_weights is {init!r}: such an adapter only fits a base model whose weights that "
            f"initialisation changed. Save it with peft's path_initial_model_for_weight_conversion to get "
            f"a plain LoRA adapter",
            "unsupported_feature",
        )

    r = raw.get("r", 8)
    if not _is_int(r) or r <= 0:
        raise AdapterError(f"r must be a positive integer, not {r!r}", "bad_config")
    alpha = raw.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise AdapterError(f"lora_alpha must be a finite number, not {alpha!r}", "bad_config")
    target_modules = _names_or_regex(raw, "target_modules")
    if not target_modules:
        raise AdapterError("target_modules is empty: the adapter targets no module", "bad_config")
    layers = raw.get("layers_to_transform")
    if _is_int(layers) and layers >= 0:
        layers = frozenset([layers])
    elif isinstance(layers, list) and all(_is_int(i) and i >= 0 for i in layers):
        layers = frozenset(layers) or None  # peft: an empty list means every layer
    elif layers is not None:
        raise AdapterError(f"layers_to_transform must be a layer index or a list of them, not {layers!r}", "bad_config")
    layers_pattern = _names_or_regex(raw, "layers_pattern")
    return _LoraConfig(
        r=r,
        alpha=alpha,
        use_rslora=_flag(raw, "use_rslora"),
        use_dora=_flag(raw, "use_dora"),
        lora_bias=_flag(raw, "lora_bias"),
        target_modules=target_modules,
        exclude_modules=_names_or_regex(raw, "exclude_modules"),
        layers_to_transform=layers,
        layers_pattern=(layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern,
        rank_pattern=_pattern(raw, "rank_pattern", lambda v: _is_int(v) and v > 0, "a positive integer"),
        alpha_pattern=_pattern(raw, "alpha_pattern", _is_number, "a finite number"),
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    if not (_is_int(value) or isinstance(value, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _flag(raw: dict, field: str) -> bool:
    value = raw.get(field) or False  # null means the default, false
    if not isinstance(value, bool):
        raise AdapterError(f"{field} must be true or false, not {value!r}", "bad_config")
    return value


def _names_or_regex(raw: dict, field: str) -> str | tuple[str, ...]:
    """A list of names (as a tuple), or one string (a regex), checked to compile; () when absent."""
    value = raw.get(field)
    if value is None:
        return ()
    if isinstance(value, str):
        _compile(value, field)
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise AdapterError(f"{field} must be a list of module names or a regex string, not {value!r}", "bad_config")


def _pattern(raw: dict, field: str, valid, wanted: str) -> dict:
    value = raw.get(field) or {}
    if not isinstance(value, dict):
        raise AdapterError(f"{field} must be an object mapping module patterns to values, not {value!r}", "bad_config")
    for key, item in value.items():
        _compile(key, f"{field} key")
        if not valid(item):
            raise AdapterError(f"{field}[{key!r}] must be {wanted}, not {item!r}", "bad_config")
    return value


def _compile(regex: str, what: str) -> None:
    try:
        re.compile(regex)
    except re.error as error:
        raise AdapterError(f"{what} {regex!r} is not a valid regular expression: {error}", "bad_config") from None


def _check_architecture(base_model: object, model_type: str) -> None:
    """Refuse an adapter whose base_model_name_or_path names another architecture: a local model folder is
    compared by its config's model_type, a hub id by the families in _FAMILIES. Anything else passes."""
    if base_model is None:
        return
    if not isinstance(base_model, str):
        raise AdapterError(f"base_model_name_or_path must be a string, not {base_model!r}", "bad_config")
    local_config = Path(base_model) / "config.json"
    try:
        theirs = json.loads(local_config.read_bytes()).get("model_type")
    except (OSError, ValueError, AttributeError):  # no such folder, or not a readable model config
        theirs = None
    if theirs is not None:
        if theirs != model_type:
            raise AdapterError(
                f"it was trained on {base_model} (model_type {theirs!r}), but the base model is {model_type!r}",
                "wrong_architecture",
            )
        return
    last = re.split(r"[/\\]", base_model.rstrip("/\\"))[-1].lower()
    allowed = [types for family, types in _FAMILIES if family.search(last)]
    if allowed and not any(model_type in types for types in allowed):
        raise AdapterError(
            f"it was trained on {base_model!r}, a different model family than the base model ({model_type!r})",
            "wrong_architecture",
        )


# ---- peft's matching rules -----------------------------------------------------------------------------------


def _targeted_modules(config: _LoraConfig, raw: dict, base: BaseModelInfo) -> list[str]:
    """The base modules the config adapts, in the base model's order: linear layers, the output head, the input
    embeddings (plain LoRA only on these, as peft: it refuses lora_bias there, and DoRA is not served)."""
    from peft.tuners.tuners_utils import check_target_module_exists  # seconds to import: only when reading adapters

    if isinstance(config.target_modules, tuple):
        # peft fails only when no entry matches; an entry naming no module (a generic list) is noted.
        names = base.modules
        absent = [t for t in config.target_modules if not any(m == t or m.endswith(f".{t}") for m in names)]
        if absent:
            log.warning("target_modules %s name no module of the base model", absent)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        # What peft's _maybe_include_all_linear_layers does before matching: every linear layer but the head.
        config = replace(config, target_modules=tuple(base.linear_modules))
    targeted = [module for module in base.modules if check_target_module_exists(config, module)]
    if not targeted:
        raise AdapterError(
            f"target_modules {_show(config.target_modules)} matches no module of the base model "
            f"({base.model_type}; its layers are named like {_show(_short_names(base.linear_modules))})",
            "missing_module",
        )
    vocab = [module for module in targeted if module in base.vocab_modules]
    embeddings = [module for module in vocab if module in base.embeddings]
    if embeddings and (config.use_dora or config.lora_bias):
        raise AdapterError(
            f"{'use_dora' if config.use_dora else 'lora_bias'} is set and target_modules selects the embedding "
            f"{embeddings[0]}: only plain LoRA is served on embeddings", "unsupported_feature",
        )
    if vocab and _flag(raw, "ensure_weight_tying"):
        raise AdapterError(
            f"ensure_weight_tying is set and target_modules selects {vocab[0]}: LoRA shared between tied embeddings "
            f"and head is not supported", "unsupported_feature",
        )
    return targeted


# ---- the tensors ---------------------------------------------------------------------------------------------


def _bind_tensors(keys: Iterable[str], base: BaseModelInfo, targeted: list[str]) -> dict[str, dict[str, str]]:
    """Map each tensor name to a targeted base module: {module: {part: key}}, parts as in _PART_SUFFIXES. Refuses
    every tensor that is not a part of a targeted module, saying what it looks like."""
    targeted_set = set(targeted)
    bound: dict[str, dict[str, str]] = {}
    unbound = []
    for key in sorted(keys):  # sorted: the same file gives the same message
        for suffix, (part, of_embedding) in _PART_SUFFIXES.items():
            if key.startswith(_KEY_PREFIX) and key.endswith(suffix):
                module = key[len(_KEY_PREFIX) : -len(suffix)]
                break
        else:
            if ".lora_A.bias" in key:
                raise AdapterError(f"{key} is a bias on lora_A, which peft never trains: not supported", "bias")
            unbound.append(key)
            continue
        if module not in base.modules:
            raise AdapterError(
                f"{key} is for {module}, which the base model ({base.model_type}) does not have as a linear layer "
                f"or embedding: the adapter was trained for a different model",
                "missing_module",
            )
        if module not in targeted_set:
            unbound.append(key)
            continue
        is_embedding = module in base.embeddings
        if of_embedding is None and module not in base.vocab_modules or of_embedding not in (None, is_embedding):
            kind = "an embedding" if is_embedding else "a linear layer"
            raise AdapterError(f"{key} is not a LoRA part of {module}, which is {kind} of the base model",
                               "unbound_tensor")
        bound.setdefault(module, {})[part] = key
    if unbound:
        raise AdapterError(
            f"{len(unbound)} tensor(s) in {WEIGHTS_FILE} are not the lora_A/lora_B weights (or lora_embedding_A/B, "
            f"DoRA magnitude, lora_B bias) of a module the config targets: {_show(unbound)}",
            "unbound_tensor",
        )
    return bound


def _check_parts(module: str, keys: dict[str, str] | None, config: _LoraConfig) -> dict[str, str]:
    """The module's tensor keys by part, once it has exactly the parts its config calls for."""
    if keys is None or not keys.keys() & {"A", "B"}:
        raise AdapterError(
            f"the config targets {module}, but {WEIGHTS_FILE} has no lora_A/lora_B weights for it", "missing_tensor"
        )
    for half, other in (("A", "B"), ("B", "A")):
        if half not in keys:
            raise AdapterError(f"{keys[other]} has no matching lora_{half} tensor", "incomplete_pair")
    for part, (flag, name, code) in _OPTIONAL_PARTS.items():
        wanted = getattr(config, flag)
        if part in keys and not wanted:
            raise AdapterError(f"{keys[part]} is a {name} tensor, but the config does not set {flag}", code)
        if wanted and part not in keys:
            raise AdapterError(f"the config sets {flag}, but {WEIGHTS_FILE} has no {name} for {module}",
                               "missing_tensor")
    return keys


def _module_weights(
    tensors: dict[str, dict], module: str, keys: dict[str, str], config: _LoraConfig, base: BaseModelInfo, max_rank: int
) -> LoraModuleWeights:
    """One module's tensors, checked against the config's rank and the base layer's shape."""
    from peft.utils.other import get_pattern_key  # seconds to import: only when reading adapters

    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern, module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, module), config.alpha)
    if rank > max_rank:
        raise AdapterError(
            f"{module} has rank {rank}, above the server's limit of {max_rank}: restart the server with "
            f"--max-lora-rank {rank} or more to serve this adapter",
            "rank_too_large",
        )
    in_features, out_features = base.modules[module]
    # the base weight peft saved: an embedding's [num_embeddings, dim], a linear's [out, in]
    base_copy = [in_features, out_features] if module in base.embeddings else [out_features, in_features]
    expected = {"A": [rank, in_features], "B": [out_features, rank], "magnitude": [out_features],
                "bias": [out_features], "base_copy": base_copy}
    weights = {}
    for part, key in keys.items():
        entry = tensors[key]
        if entry["dtype"] not in _DTYPES:
            wanted = ", ".join(_DTYPES)
            raise AdapterError(f"{key} has dtype {entry['dtype']}: LoRA weights must be one of {wanted}", "bad_dtype")
        if entry["shape"] != expected[part]:
            raise AdapterError(
                f"{key} has shape {entry['shape']}, but {module} needs {expected[part]} (in_features={in_features}, "
                f"out_features={out_features} in the base model, rank {rank} in the config)",
                "shape_mismatch",
            )
        # Little-endian, as safetensors stores it (and as every host torch runs on here is).
        tensor = torch.frombuffer(entry["data"], dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        if not torch.isfinite(tensor).all():
            count = int((~torch.isfinite(tensor)).sum())
            raise AdapterError(f"{key} holds {count} non-finite value(s) (NaN or Inf)", "non_finite")
        weights[part] = tensor
    weights.pop("base_copy", None)  # checked, not kept: the base's own weight
    scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank  # as peft's LoraLayer.update_layer
    return LoraModuleWeights(rank=rank, scale=scale, **weights)


# ---- messages ------------------------------------------------------------------------------------------------


def _show(items, limit: int = 5) -> str:
    """A short rendering of a regex or of a list of names: the first few, then how many more."""
    if isinstance(items, str):
        return repr(items)
    items = list(items)
    shown = ", ".join(items[:limit])
    return f"[{shown}, and {len(items) - limit} more]" if len(items) > limit else f"[{shown}]"


def _short_names(modules: Iterable[str]) -> list[str]:
    return sorted({module.rsplit(".", 1)[-1] for module in modules})
