"""Engine settings: what the Python API configures and what the CLI's engine flags are generated from.

Each field's name gives its flag (`max_batch_tokens` -> `--max-batch-tokens`; `flag` in the field's extra data
overrides it), its type and Literal choices the flag's parsing, its description the flag's help.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..models.dtype import DtypeName


# A step's token budget where --max-batch-tokens is not given. On a GPU up to a few thousand tokens cost about what
# one does; on a CPU a step's time grows with its tokens from a few dozen on (its cores reach their matrix peak
# there), so a larger step only makes every prefill in it wait for the others, and the running streams for all of
# them (loadtest/RESULTS.md, "The step's token budget on the CPU").
DEFAULT_BATCH_TOKENS = {"cuda": 2048, "cpu": 512}


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None, description="local HF model directory, or a built-in model: smollm2-135m-instruct (the "
        "default) or tiny-random", json_schema_extra={"metavar": "DIR|NAME"},
    )
    quantize: Literal["nf4", "int8", "none"] | None = Field(
        default=None, description="bitsandbytes quantization of the linear layers (default: nf4 on CUDA, none on CPU)"
    )
    dtype: DtypeName = Field(
        default="auto", description="compute dtype; auto: bfloat16 on CUDA and on CPUs with AMX-BF16 or AVX512-BF16, "
        "float32 on other CPUs",
    )
    device: Literal["cpu", "cuda"] | None = Field(default=None, description="default: cuda when available")
    max_batch_tokens: int | None = Field(
        default=None, ge=1, description="tokens per engine step: decodes + prefill chunks (default: 2048 on CUDA, 512 "
        "on the CPU, where a step takes time in proportion to its tokens)",
    )
    max_num_seqs: int = Field(default=256, ge=1, description="requests running at once; more wait in the queue")
    scheduling: Literal["fcfs", "fair"] = Field(
        default="fair", description="admission order of waiting requests: fair (the tenant, or adapter, with the "
        "least weighted tokens served first: virtual token counters) or fcfs (first come first served)",
    )
    max_model_len: int | None = Field(default=None, ge=2, description="context limit (default: the model's)")
    kv_cache_memory: str | int | None = Field(
        default=None, description="KV cache budget, e.g. 2GiB (default: a share of free memory)",
        json_schema_extra={"metavar": "SIZE"},
    )
    kv_cache_fraction: float = Field(
        default=0.9, gt=0, le=1, description="without a budget: this share of free device memory (host RAM on CPU)"
    )
    block_size: int = Field(default=16, ge=1, description="tokens per KV cache block")
    adapters_dir: str | None = Field(
        default=None, description="folder of PEFT LoRA adapters, one per subfolder (its name), or an object-store "
        "URL s3://bucket/prefix fetched on first use",
        json_schema_extra={"flag": "--adapters", "metavar": "DIR|URL"},
    )
    adapter_registry: str | None = Field(
        default=None, description="file (or s3:// URL) where adapters loaded and unloaded by name through the admin "
        "API are recorded, and registered again at start (default: not kept)", json_schema_extra={"metavar": "FILE"},
    )
    max_gpu_adapters: int = Field(default=8, ge=0, description="adapter slots on the device (0 disables LoRA)")
    max_cpu_adapters: int = Field(default=32, ge=1, description="adapters kept in the host cache")
    max_lora_rank: int = Field(default=64, ge=1, description="largest adapter rank accepted; sizes the slot buffers")
    prefix_caching: bool = Field(
        default=True, description="compute a prompt's leading full KV blocks once: later requests with the same "
        "model (base, or adapter version), salt (tenant, cache_salt) and leading tokens reuse them",
    )
    grammar_compile_timeout: float = Field(
        default=10.0, gt=0, description="seconds a structured output's JSON schema, regex or grammar may take to "
        "compile; a slower one is refused (400)",
    )
    cuda_graphs: bool = Field(
        default=True, description="on CUDA, replay decode steps from CUDA graphs captured per batch-size bucket"
    )
    lora_target_modules: list[str] | None = Field(
        default=None, description="comma-separated short names of the modules adapters may target, e.g. "
        "q_proj,v_proj; embed_tokens and lm_head too, each slot there taking vocab x max-lora-rank values "
        "(default: every linear but the output head)", json_schema_extra={"metavar": "NAMES"},
    )
