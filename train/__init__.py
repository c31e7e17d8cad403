"""The bundled trainer (`loradock train`) and the demo (`loradock demo`).

config (the options) -> data (JSONL rows to masked token ids, as the server tokenizes them) -> model (the base as
the server loads it, LoRA on top) -> trainer (transformers' Trainer, evaluations) -> export (PEFT files validated
by the server's own checks, renamed into place) + report (JSON and loss curve) -> register (hot-load into a
running server). cli holds the two subcommands; demo, demo_server and tasks are the demo.
"""
