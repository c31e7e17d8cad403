"""One training run: data, model, transformers' Trainer, evaluation before and after, export.

The Trainer brings the progress bar, gradient accumulation, checkpoints and resuming, early stopping, mixed
precision, and distribution: launched with ``torchrun --nproc_per_node N`` or ``accelerate launch``, every process
runs this same code on its own device (gloo on CPUs, NCCL on GPUs); only the first writes the adapter.

--method dpo swaps two parts: preference pairs (dpo: encoded as the SFT rows are) and TRL's DPOTrainer, with its
own held-out evaluation; the rest of the run is the same.

The package, in order: config (the options) -> data (JSONL rows to masked token ids, as the server tokenizes them;
dpo for preference pairs) -> model (the base as the server loads it, LoRA on top; init_adapter to start from an
adapter) -> trainer (this module) -> export (PEFT files validated by the server's own checks, renamed into place) +
report (JSON and loss curve) -> gate (evaluate through an in-process server: evaluate, metrics, intervals,
openai_client, forgetting) -> register (hot-load into a running server). cli holds the subcommands (train, eval,
demo); demo, demo_server and tasks are the demo.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..serve.models.source import resolve_model_path
from .batching import ExampleDataset, make_collator
from .config import TrainConfig
from .data import (
    DataError,
    DataStats,
    Example,
    RowEncoder,
    check_row,
    check_rows,
    load_examples,
    require_labels,
    split_examples,
)
from .dpo import (
    check_pair,
    dpo_trainer,
    drop_reference_adapter,
    load_pairs,
    pair_stats,
    preference_metrics,
    require_pairs,
)
from .export import write_adapter
from .init_adapter import load_from_adapter
from .model import TrainableModel, load_trainable
from .progress import TrainingProgress, quiet_libraries
from .report import build_report

log = logging.getLogger("loradock.train")

EVALUATIONS_PER_RUN = 10  # the default --eval-steps spaces this many evaluations (and checkpoints) over a run
LOG_POINTS_PER_RUN = 50  # training-loss points in the report and the curve


@dataclass
class TrainResult:
    """The adapter folder and the report written beside it; both None on every process but the first."""

    output: Path | None
    report: dict | None


@dataclass
class _Data:
    train: list  # Examples (SFT) or Pairs (DPO)
    validation: list
    stats: dict


def train(config: TrainConfig) -> TrainResult:
    """Train a LoRA adapter as `config` says and write it (with its report and loss curve) to config.output."""
    with quiet_libraries():
        return _train(config)


def _train(config: TrainConfig) -> TrainResult:
    from transformers import EarlyStoppingCallback, PrinterCallback, set_seed

    started = time.perf_counter()
    if config.output.exists():
        raise ValueError(f"{config.output} already exists: choose another --output or remove it")
    _check_rows(config)
    checkpoint = _resume_checkpoint(config)
    model_path = resolve_model_path(config.model).resolve()  # the adapter config records it: absolute
    set_seed(config.seed)  # the LoRA initialisation, then (the Trainer seeds again) dropout and data order
    trainable = _load_model(config, model_path)
    data = _load_data(config, RowEncoder(trainable.tokenizer, trainable.stop_ids))
    if config.early_stopping and not data.validation:
        raise DataError("--early-stopping needs validation rows: give --eval or a --val-split above 0")
    steps = _planned_steps(config, len(data.train))
    callbacks = [EarlyStoppingCallback(early_stopping_patience=config.early_stopping)] if config.early_stopping else []
    arguments = _training_arguments(config, trainable, steps, bool(data.validation))
    if config.method == "dpo":
        trainer = dpo_trainer(config, trainable, data.train, data.validation, arguments, callbacks)
        pad_id = trainable.tokenizer.pad_token_id  # TRL sets it (to EOS when the tokenizer has none)

        def evaluate() -> dict:
            return preference_metrics(trainable.model, data.validation, config.beta, pad_id, config.batch_size)
    else:
        trainer = _sft_trainer(config, trainable, data, arguments, callbacks)

        def evaluate() -> dict:
            return _evaluate(trainer)
    trainer.remove_callback(PrinterCallback)  # it prints each log line as a dict: TrainingProgress shows them
    if not config.quiet:
        trainer.add_callback(TrainingProgress(config.adapter_name))
    before = evaluate() if data.validation else None
    trained = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - trained
    after = evaluate() if data.validation else None
    first, world_size = trainer.is_world_process_zero(), trainer.args.world_size
    _leave_process_group()
    if not first:
        return TrainResult(None, None)
    drop_reference_adapter(trainable.model)
    report = build_report(
        config=config, model_path=model_path, trainable=trainable, data=data.stats, history=trainer.state.log_history,
        before=before, after=after, steps=outcome.global_step, train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started, resumed_from=checkpoint, world_size=world_size,
    )
    output = write_adapter(trainable.model, config.output, trainable.base_info, report)
    return TrainResult(output, report)


def _check_rows(config: TrainConfig) -> None:
    """Every row's shape, before the model loads (what the chat template refuses is found when encoding)."""
    check = check_pair if config.method == "dpo" else check_row
    for path in (config.data, config.eval):
        if path is not None:
            check_rows(path, check)


def _load_model(config: TrainConfig, model_path: Path) -> TrainableModel:
    if config.init_adapter is not None:
        return load_from_adapter(model_path, config.init_adapter, config.quantize, config.gradient_checkpointing)
    return load_trainable(model_path, config.quantize, config.targets, config.rank, config.alpha, config.dropout,
                          config.gradient_checkpointing, config.dora)


def _sft_trainer(config: TrainConfig, trainable: TrainableModel, data: _Data, arguments: dict, callbacks: list):
    from transformers import Trainer, TrainingArguments

    return Trainer(
        model=trainable.model,
        args=TrainingArguments(**arguments),
        data_collator=make_collator(trainable.tokenizer, config.packing),
        train_dataset=ExampleDataset(data.train),
        eval_dataset=ExampleDataset(data.validation) if data.validation else None,
        callbacks=callbacks,
    )


def _planned_steps(config: TrainConfig, train_rows: int) -> int:
    """Optimizer steps the run will take (as the Trainer counts them), for spacing evaluations and logs."""
    if config.max_steps:
        return config.max_steps
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = math.ceil(train_rows / (config.batch_size * world))
    return max(1, math.ceil(config.epochs * max(1, batches // config.grad_accum)))


def _resume_checkpoint(config: TrainConfig) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not config.resume:
        return None
    if config.resume is True:
        found = get_last_checkpoint(str(config.checkpoint_dir)) if config.checkpoint_dir.is_dir() else None
        if found is None:
            raise ValueError(f"--resume: no checkpoint in {config.checkpoint_dir} (checkpoints are saved every "
                             f"--eval-steps steps)")
        return found
    if not Path(config.resume).is_dir():
        raise ValueError(f"--resume {config.resume}: no such checkpoint folder")
    return str(config.resume)


def _load_data(config: TrainConfig, encoder: RowEncoder) -> _Data:
    """The training and validation rows encoded: Examples for SFT, Pairs for DPO."""
    if config.method == "dpo":
        read, stats_of, require = load_pairs, pair_stats, require_pairs
    else:
        read, stats_of, require = load_examples, _example_stats, require_labels

    def load(path: Path) -> tuple[list, int]:
        return read(path, encoder, config.max_seq_len)

    train, skipped = load(config.data)
    stats = {"train_file": str(config.data), "skipped_too_long": skipped}
    if config.eval is not None:
        validation, eval_skipped = load(config.eval)
        stats.update(eval_file=str(config.eval), eval_skipped_too_long=eval_skipped)
    else:
        train, validation = split_examples(train, config.val_split, config.seed)
        stats.update(val_split=config.val_split)
    require(train, str(config.data))
    stats.update(train=stats_of(train), validation=stats_of(validation))
    log.info("data: %d training rows, %d validation rows", len(train), len(validation))
    return _Data(train, validation, stats)


def _example_stats(examples: list[Example]) -> dict:
    return vars(DataStats.of(examples))


def _training_arguments(config: TrainConfig, trainable: TrainableModel, steps: int, has_eval: bool) -> dict:
    """transformers' TrainingArguments for the run, as keyword arguments (DPO adds its own to them)."""
    import torch

    every = config.eval_steps or max(1, steps // EVALUATIONS_PER_RUN)
    # Passed only when asked for: transformers 5.x warns that the option is being renamed.
    checkpointing = ({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
                     if config.gradient_checkpointing else {})
    return dict(
        output_dir=str(config.checkpoint_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        logging_steps=max(1, steps // LOG_POINTS_PER_RUN),
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=every,
        save_strategy="steps",
        save_steps=every,
        save_total_limit=2,
        load_best_model_at_end=bool(config.early_stopping),
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=trainable.device.type == "cpu",
        bf16=trainable.dtype == torch.bfloat16,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,  # transformers' bar writes a dict per log line; TrainingProgress replaces it
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        **checkpointing,
    )


def _leave_process_group() -> None:
    """In a distributed run, every process finishes its collectives here, together, and leaves the process group
    before the first one writes the adapter: a process exiting while a peer still uses gloo can abort."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _evaluate(trainer) -> dict:
    loss = trainer.evaluate()["eval_loss"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
