"""What a training run leaves beside its adapter: training_report.json and loss_curve.png."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

REPORT_FILE = "training_report.json"
CURVE_FILE = "loss_curve.png"
FORGETTING_FILE = "forgetting.png"
# The files that decide what the base model computes and how text becomes tokens (the chat template included).
_FINGERPRINTED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja", "special_tokens_map.json")


def fingerprint(model_path: Path) -> dict:
    """sha256 over the base model's weights, config and tokenizer files (names and bytes, in name order), so
    that an adapter can be matched with the exact base it was trained on."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_path.iterdir() if p.name in _FINGERPRINTED or p.suffix == ".safetensors")
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return {"sha256": digest.hexdigest(), "files": [p.name for p in files]}


def build_report(
    *, config, model_path: Path, trainable, data: dict, history: list[dict], before: dict | None,
    after: dict | None, steps: int, train_seconds: float, total_seconds: float, resumed_from: str | None,
    world_size: int,
) -> dict:
    """The report as a JSON-ready dict: options, base model, data, losses, evaluations, timings."""
    model_config = trainable.model.get_base_model().config
    lora = trainable.model.peft_config["default"]  # the adapter's own, also when it came from --init-adapter
    return {
        "adapter": config.adapter_name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config.to_json(),
        "base_model": {
            "path": str(model_path.resolve()),
            "model_type": model_config.model_type,
            "fingerprint": fingerprint(model_path),
            "quantize": trainable.quantize,
            "dtype": str(trainable.dtype).removeprefix("torch."),
        },
        "lora": {"rank": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout, "dora": lora.use_dora,
                 "target_modules": trainable.targets,
                 "trainable_parameters": trainable.model.get_nb_trainable_parameters()[0]},
        "data": data,
        "losses": {
            "train": [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate")}
                      for h in history if "loss" in h],
            "eval": _eval_points(history, before),
        },
        "eval_before": before,
        "eval_after": after,
        "steps": steps,
        "resumed_from": resumed_from,
        "time": {
            "train_seconds": round(train_seconds, 2),
            "total_seconds": round(total_seconds, 2),
            "steps_per_second": round(steps / train_seconds, 3) if train_seconds > 0 else None,
        },
        "environment": {"device": str(trainable.device), "torch": torch.__version__, "python": platform.python_version(),
                        "world_size": world_size},
    }


def _eval_points(history: list[dict], before: dict | None) -> list[dict]:
    """Validation loss by step: the evaluation before training as step 0 (the Trainer's history starts with
    training), then each evaluation the Trainer logged, one per step."""
    points = {0: before["loss"]} if before else {}
    points.update({h["step"]: h["eval_loss"] for h in history if "eval_loss" in h})
    return [{"step": step, "loss": loss} for step, loss in sorted(points.items())]


def write_report(report: dict, folder: Path) -> None:
    """training_report.json and loss_curve.png into `folder`."""
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot_losses(report, folder / CURVE_FILE)


def add_to_report(folder: Path, sections: dict) -> None:
    """Add `sections` to the training_report.json in `folder` (replaced whole, never half-written), and the forgetting
    plot when they hold a forgetting evaluation."""
    from .forgetting import plot_forgetting

    path = folder / REPORT_FILE
    report = {**json.loads(path.read_text(encoding="utf-8")), **sections}
    staging = path.with_name(f".{REPORT_FILE}.writing")
    staging.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(staging, path)
    evaluation = sections.get("evaluation") or {}
    if evaluation.get("forgetting"):
        plot_forgetting(evaluation["forgetting"], evaluation["model"], evaluation["baseline"], folder / FORGETTING_FILE)


def plot_losses(report: dict, path: Path) -> None:
    """Training loss per logged step, and validation loss at each evaluation, on one chart."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4), dpi=100)
    train, evals = report["losses"]["train"], report["losses"]["eval"]
    axes.plot([p["step"] for p in train], [p["loss"] for p in train], label="training loss", color="tab:blue")
    if evals:
        axes.plot([p["step"] for p in evals], [p["loss"] for p in evals], "o-", label="validation loss",
                  color="tab:orange")
    axes.set_xlabel("step")
    dpo = report["config"]["method"] == "dpo"
    axes.set_ylabel("DPO loss (preference pairs)" if dpo else "loss (completion tokens)")
    kind = "DoRA" if report["lora"]["dora"] else "LoRA"
    axes.set_title(f"{report['adapter']}: {kind} r={report['lora']['rank']} on {Path(report['base_model']['path']).name}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
