"""The one error type for an adapter that cannot be served."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter that cannot be read, validated or used. The message says what is wrong in a sentence
    that names the problem (the file, tensor, module, field or flag); ``code`` says it in one word for
    programs. Codes raised while reading an adapter (``peft_format.read_adapter``):

    missing_file     the adapter folder, adapter_config.json or adapter_model.safetensors is absent
    pickle_weights   only adapter_model.bin is present (never unpickled)
    corrupt_file     the safetensors file is truncated or malformed
    too_large        the safetensors file is larger than any valid adapter for this base and rank limit
    bad_config       adapter_config.json is not a JSON object, or a field has the wrong type or value
    not_lora         peft_type is not LORA
    dora             a lora_magnitude_vector (DoRA) in an adapter whose config does not set use_dora
    modules_to_save  the adapter carries fully trained copies of base modules
    bias             trained base biases (bias other than "none"), a lora_A bias, or a lora_B bias without
                     lora_bias
    unsupported_feature  another LoRA variant or option that changes the forward pass or the base weights (DoRA
                     or lora_bias on an embedding, ensure_weight_tying with an embedding or head target)
    wrong_architecture   base_model_name_or_path names a different model family than the base's
    missing_module   a tensor names a module the base model does not have
    unbound_tensor   a tensor that is not a LoRA part (lora_A/lora_B weight, magnitude, lora_B bias) of a module
                     the config targets
    missing_tensor   a module the config targets has no weights in the file, or lacks the magnitude vector
                     (use_dora) or lora_B bias (lora_bias) its config calls for
    incomplete_pair  a module has lora_A but no lora_B, or the reverse
    shape_mismatch   a tensor's shape disagrees with the base module or with the config's rank
    rank_too_large   a module's rank exceeds the server's --max-lora-rank
    bad_dtype        a tensor that is not float16, bfloat16, float32 or float64
    non_finite       a tensor holds NaN or Inf, or DoRA's scale m / ‖W + s·B A‖ is not finite on this base

    And ``missing_extra``: an object-store URL whose filesystem package is not installed (s3://: loradock[s3]);
    ``no_slots`` (the adapter manager): the adapter adapts a module the server allocated no LoRA slots for
    (--lora-target-modules).
    """

    def __init__(self, message: str, code: str = "invalid_adapter"):
        super().__init__(message)
        self.code = code
