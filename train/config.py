"""Every option of a training run, with its default: what `loradock train` flags and YAML keys set."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
METHODS = ("sft", "dpo")


@dataclass
class TrainConfig:
    data: Path
    output: Path  # the adapter folder to write (it must not exist yet)
    model: str | None = None  # local HF model directory or a built-in name; None: the default model
    eval: Path | None = None  # a validation file; without it, val_split of data is held out
    val_split: float = 0.1  # ignored when eval is given
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str = "all-linear"  # or short names, comma-separated: q_proj,v_proj
    dora: bool = False  # DoRA (peft's use_dora): a trained magnitude per output row beside A and B
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    lr: float = 2e-4
    scheduler: str = "cosine"
    warmup: float = 0.03  # below 1: a fraction of the steps; from 1: a number of steps
    batch_size: int = 8  # rows per step per process
    grad_accum: int = 1
    max_seq_len: int = 1024
    quantize: str | None = None  # nf4 | int8 | none; default as the server: nf4 on CUDA, none on CPU
    gradient_checkpointing: bool = False
    packing: bool = False
    seed: int = 0
    resume: bool | str = False  # True: the latest checkpoint in checkpoint_dir; a path: that checkpoint
    early_stopping: int | None = None  # evaluations without improvement before stopping
    eval_steps: int | None = None  # default: about ten evaluations per run
    checkpoint_dir: Path | None = None  # default: "<output>.checkpoints" beside the output
    register: str | None = None  # a running server's URL: hot-load the adapter there when done
    admin_token: str | None = None
    name: str | None = None  # the adapter's name on the server; default: the output folder's name
    method: str = "sft"  # sft: prompt/completion or messages rows; dpo: {"prompt" | "messages", "chosen", "rejected"}
    beta: float = 0.1  # DPO's beta: how strongly the policy is held to the reference
    init_adapter: Path | None = None  # start from this adapter (its rank, alpha, dropout and targets), not a fresh one
    eval_data: Path | None = None  # rows scored through the server after training (loradock eval's formats)
    metric: str = "exact"  # loradock eval's metric for eval_data
    pattern: str | None = None  # the regex metric's default pattern
    gate: str | None = None  # "score>=0.9,kl<=0.2": register only if every condition holds
    eval_max_tokens: int = 64  # answer length for eval_data
    quiet: bool = False  # no progress bar (the demo trains several adapters and prints its own lines)

    def __post_init__(self):
        self.data = Path(self.data)
        self.output = Path(self.output)
        self.eval = Path(self.eval) if self.eval is not None else None
        self.init_adapter = Path(self.init_adapter) if self.init_adapter is not None else None
        self.eval_data = Path(self.eval_data) if self.eval_data is not None else None
        if self.checkpoint_dir is None:
            self.checkpoint_dir = self.output.with_name(self.output.name + ".checkpoints")
        self.checkpoint_dir = Path(self.checkpoint_dir)
        problems = [
            (self.rank < 1, "--rank must be at least 1"),
            (self.alpha <= 0, "--alpha must be positive"),
            (not 0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.epochs <= 0 and not self.max_steps, "--epochs must be positive"),
            (self.max_steps is not None and self.max_steps < 1, "--max-steps must be at least 1"),
            (self.lr <= 0, "--lr must be positive"),
            (self.scheduler not in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}"),
            (self.warmup < 0, "--warmup must not be negative"),
            (self.batch_size < 1 or self.grad_accum < 1, "--batch-size and --grad-accum must be at least 1"),
            (self.max_seq_len < 2, "--max-seq-len must be at least 2"),
            (self.quantize not in (None, "nf4", "int8", "none"), "--quantize must be nf4, int8 or none"),
            (self.early_stopping is not None and self.early_stopping < 1, "--early-stopping must be at least 1"),
            (self.eval_steps is not None and self.eval_steps < 1, "--eval-steps must be at least 1"),
        ]
        problems += self._method_problems() + self._gate_problems()
        for failed, message in problems:
            if failed:
                raise ValueError(message)

    def _method_problems(self) -> list[tuple[bool, str]]:
        return [
            (self.method not in METHODS, f"--method must be one of {', '.join(METHODS)}"),
            (self.beta <= 0, "--beta must be positive"),
            (self.method == "dpo" and self.packing, "--packing is for SFT rows: DPO batches chosen and rejected pairs"),
            (self.init_adapter is not None and not (self.init_adapter / "adapter_config.json").is_file(),
             f"--init-adapter {self.init_adapter}: no adapter_config.json there"),
        ]

    def _gate_problems(self) -> list[tuple[bool, str]]:
        from .gate import TASK_MEASURES, parse_gate
        from .metrics import METRICS

        conditions = parse_gate(self.gate) if self.gate else []  # raises on a malformed gate
        return [
            (self.metric not in METRICS, f"--metric must be one of {', '.join(METRICS)}"),
            (self.eval_max_tokens < 1, "--eval-max-tokens must be at least 1"),
            (self.eval_data is None and any(c.name in TASK_MEASURES for c in conditions),
             "--gate names the task score: give the rows to score with --eval-data"),
        ]

    @property
    def adapter_name(self) -> str:
        return self.name or self.output.name

    def to_json(self) -> dict:
        """The options as the report records them (paths as strings)."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(self).items()
                if key != "admin_token"}
