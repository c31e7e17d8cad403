"""loradock: serve many LoRA adapters on one quantized base model."""

__version__ = "0.1.0"
