"""A real model's shape with random weights, as a local HF model directory: benchmarks on the layer sizes, the
attention layout and the vocabulary of a model people serve (an 8B Llama) without downloading its weights.

    python -m loradock.loadtest.random_model --shape llama-3-8b --out /dev/shm/llama-3-8b

The tokenizer is the demo model's (2048 tokens); ids above it decode to nothing, which a throughput benchmark
(random prompts, ignore_eos) does not notice. Weights: the architecture's own initialization (std 0.02), in
bf16, initialized on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import time

import torch

from ..serve.models.tiny_random import write_random_model

# transformers LlamaConfig settings of each shape (from the published config.json files)
SHAPES = {
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    # the same layout, small enough to try the whole pipeline on a CPU
    "llama-mini": dict(
        hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    ),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loradock.loadtest.random_model", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    parser.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", help="where the weights are initialized (default cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    path = write_random_model(
        args.out, "llama", seed=args.seed, dtype=DTYPES[args.dtype], device=device, initializer_range=0.02,
        **SHAPES[args.shape],
    )
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"{args.shape}: {size / 1e9:.2f} GB of {args.dtype} weights in {path} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
