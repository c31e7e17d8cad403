"""Model loading: where the base model comes from (a local folder or a built-in model built here), and loading it
and its tokenizer, quantized or not. Never downloads."""
