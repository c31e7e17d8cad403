"""Engine settings: what the CLI flags and the Python API configure."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="local HF model directory; None = built-in demo model")
    quantize: str | None = Field(default=None, description="nf4 | int8 | none; default nf4 on CUDA, none on CPU")
    dtype: str | None = Field(default=None, description="float32 | bfloat16 | float16; default bf16 CUDA, fp32 CPU")
    device: str | None = Field(default=None, description="cpu | cuda; default cuda when available")
    max_batch_tokens: int = Field(default=2048, ge=1, description="tokens per step (decodes + prefill chunks)")
    max_num_seqs: int = Field(default=256, ge=1, description="requests running at once")
    max_model_len: int | None = Field(default=None, ge=2, description="context limit; default the model's")
    kv_cache_memory: str | int | None = Field(default=None, description="KV cache budget, e.g. 2GiB")
    kv_cache_fraction: float = Field(default=0.9, gt=0, le=1, description="share of free memory for KV if no budget")
    block_size: int = Field(default=16, ge=1, description="tokens per KV cache block")
    adapters_dir: str | None = Field(default=None, description="folder of PEFT adapters, one per subfolder")
    max_gpu_adapters: int = Field(default=8, ge=0, description="adapter slots on the device; 0 disables LoRA")
    max_cpu_adapters: int = Field(default=32, ge=1, description="adapters kept in the host cache")
    max_lora_rank: int = Field(default=64, ge=1, description="largest adapter rank accepted")
    lora_target_modules: list[str] | None = Field(
        default=None, description="short names of the linears adapters may target; default every linear"
    )
