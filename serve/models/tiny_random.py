"""Tiny, locally built models: the built-in demo model and the test fixtures.

The demo model exists so that loradock can be tried fully offline, with nothing downloaded: a small
Llama with seeded random weights and a byte-level BPE tokenizer trained in-process on Python's own
standard-library sources. Its output is gibberish. For real use, point ``--model`` at a real local
Hugging Face model directory.

The same machinery writes tiny random models of every supported architecture for the tests
(``write_random_model``). Everything here is deterministic: with the same Python and library
versions, the same arguments give the same tokenizer and the same weights on every run.
"""

from __future__ import annotations

import copy
import errno
import functools
import logging
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from ...kernels.cpu_build import cache_root

logger = logging.getLogger("loradock.tiny_random")

# Bump whenever the demo model's tokenizer, config or weights change: it names the cache folder,
# so a new version is built beside the old one instead of silently reusing it.
DEMO_MODEL_VERSION = 1

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
# Trained first, so their ids are their positions here: <pad>=0, <s>=1, </s>=2, <|system|>=3,
# <|user|>=4, <|assistant|>=5, <|end|>=6. The 256 byte-level symbols follow, then the merges.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)

# Phi-3-style chat format. Every turn, whatever its role, is
#     <|role|>\n{content}<|end|>\n
# the whole conversation is preceded by one <s> (the template writes it, and apply_chat_template
# tokenizes without adding special tokens, so there is exactly one), and add_generation_prompt
# appends "<|assistant|>\n". A model ends its reply with <|end|>, which is why the written
# generation_config lists <|end|> beside </s> as an end-of-sequence id.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# How text is split into words before BPE: Qwen2's pattern (the GPT-4 style split), verbatim.
# transformers 5 always loads a "qwen2" model's tokenizer as Qwen2Tokenizer, which rebuilds the
# pipeline with this split (plus NFC normalization) around the saved vocab and merges; using the
# same split here makes every architecture's tiny model tokenize the same way.
_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Standard-library modules whose source trains the tokenizer (about 1.4 MB, under a second to
# train). Plain modules present in every CPython from 3.11 on; any one missing is skipped. Their
# text changes between Python versions, and so may the learned merges (never the special ids).
_TRAINING_MODULES = (
    "argparse", "ast", "contextlib", "dataclasses", "difflib", "doctest", "enum", "fractions",
    "functools", "inspect", "pydoc", "random", "shutil", "statistics", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "tokenize", "traceback", "typing",
)

_CONFIG_CLASSES = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma": GemmaConfig,
}

# Defaults for write_random_model: small enough that the tests run fast on a CPU.
_TINY_DEFAULTS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=2048,
    # HF's usual 0.02 leaves random logits nearly flat, and near-ties make greedy decoding flip
    # between two implementations that differ only by rounding. 0.2 spreads the logits out
    # (std about 0.2 * sqrt(hidden_size); the median top-2 gap of a greedy step is about 0.3).
    initializer_range=0.2,
)

# The demo model (see demo_model_path).
_DEMO_CONFIG = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=688,
    max_position_embeddings=2048,
)
_DEMO_VOCAB_SIZE = 2048


def build_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on standard-library sources, deterministically.

    ``tokenizer(text)`` returns ``<s>`` followed by the text's tokens (Llama's convention; pass
    ``add_special_tokens=False`` to leave it out); no ``</s>`` is added. Byte-level, so any unicode
    text round-trips exactly through encode and decode. ``len(tokenizer) == vocab_size``.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Byte-level BPE needs no unknown token. Saved explicitly as null, so that Qwen2Tokenizer
        # does not add its default "<|endoftext|>" on reload (which would outgrow the model's vocab).
        unk_token=None,
        extra_special_tokens=[SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=_TINY_DEFAULTS["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@functools.cache
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train the backend tokenizer once per vocab size per process; return it serialized."""
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + 256} (specials + bytes)")
    tokenizer = Tokenizer(models.BPE())
    # No normalizer and no prefix space: decode(encode(text)) gives back text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_texts(), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"the training text yields only {tokenizer.get_vocab_size()} tokens, not {vocab_size}"
        )
    # The backend's post-processor is what adds <s>, and it is saved in tokenizer.json, so a
    # reloaded tokenizer behaves the same. (transformers 5 neither saves nor trusts `add_bos_token`;
    # the attribute reads False here although <s> is added.)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, tokenizer.token_to_id(BOS_TOKEN))],
    )
    return tokenizer.to_str()


def _training_texts() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / f"{name}.py" for name in _TRAINING_MODULES]
    return [file.read_text(encoding="utf-8") for file in files if file.is_file()]


def write_random_model(
    path: str | Path,
    architecture: str = "llama",
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **config_overrides,
) -> Path:
    """Write a complete local HF model directory with seeded random weights; return its path.

    The directory holds config.json, model.safetensors, generation_config.json and the tokenizer
    files, and loads with ``from_pretrained(path, local_files_only=True)``. ``architecture`` is
    one of llama, mistral, qwen2, qwen3, gemma. ``tokenizer`` defaults to ``build_tokenizer()``;
    the vocab size and the bos/eos/pad ids come from it.
    ``config_overrides`` go to the transformers config class and win over the tiny defaults
    (hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128, initializer_range 0.2).
    The weights are initialized on ``device`` (a GPU initializes an 8B model in seconds) and saved in ``dtype``.

    The model is built in a temporary folder beside ``path`` and renamed into place, so ``path``
    never holds a half-written model. An existing non-empty ``path`` is an error; if another
    process creates it while this one is building, theirs is kept and this one discarded.
    """
    path = Path(path)
    if architecture not in _CONFIG_CLASSES:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {sorted(_CONFIG_CLASSES)}")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not an empty directory")
    tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else build_tokenizer()

    settings = dict(
        _TINY_DEFAULTS,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=str(dtype).removeprefix("torch."),
    )
    if architecture == "mistral":
        settings["sliding_window"] = None
    if architecture == "qwen2":
        settings["use_sliding_window"] = False
    settings.update(config_overrides)
    # Several config classes default head_dim to a fixed 128 or 256 instead of deriving it.
    settings.setdefault("head_dim", settings["hidden_size"] // settings["num_attention_heads"])
    if settings["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {settings['vocab_size']} is below the tokenizer's {len(tokenizer)}")
    config = _CONFIG_CLASSES[architecture](**settings)
    tokenizer.model_max_length = config.max_position_embeddings

    # Seed a private copy of the RNG so that callers' random state is left alone.
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=_stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            # Atomic; replaces an empty directory, fails if another process has filled `path`.
            os.rename(staging, path)
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            logger.info("%s was written by another process meanwhile; keeping that one", path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> int | list[int]:
    """The eos id, plus the id of <|end|> (which ends a chat turn) when the tokenizer has it."""
    end_id = tokenizer.get_vocab().get(END_TOKEN)
    if end_id is None or end_id == tokenizer.eos_token_id:
        return tokenizer.eos_token_id
    return [tokenizer.eos_token_id, end_id]


def demo_model_path(cache_dir: str | Path | None = None) -> Path:
    """Return the built-in demo model's directory, building it there on first use (seconds).

    It lives in ``demo-model-v{DEMO_MODEL_VERSION}`` under ``cache_dir``, else under
    ``$LORADOCK_CACHE_DIR``, else under ``platformdirs.user_cache_dir("loradock")``.
    The demo model is a Llama: 4 layers, hidden 256, 4 attention heads, 2 kv heads, intermediate
    688, vocab 2048, 2048 positions, fp32, seed 0. Its output is gibberish.
    """
    path = Path(cache_dir if cache_dir is not None else cache_root()) / f"demo-model-v{DEMO_MODEL_VERSION}"
    # write_random_model renames a finished directory into place, so a config means it is complete.
    if (path / "config.json").is_file():
        return path
    logger.info("building the loradock demo model (random weights, gibberish output) in %s", path)
    return write_random_model(
        path,
        "llama",
        tokenizer=build_tokenizer(_DEMO_VOCAB_SIZE),
        seed=0,
        **_DEMO_CONFIG,
    )
