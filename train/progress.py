"""What a training run shows on the terminal: one progress bar over the optimizer steps with the latest training
loss beside it, and one formatted line per evaluation during training. It replaces transformers' own printing (a
dict per log line); the run's summary is printed by its caller from the report."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging


class TrainingProgress(TrainerCallback):
    """A tqdm bar named `label` on the first process: steps done of the planned ones, "loss" from the latest log."""

    def __init__(self, label: str):
        self.label = label
        self.bar: tqdm | None = None
        self.shown = 0  # steps the bar has counted

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc=self.label, unit="step", dynamic_ncols=True)
            self.shown = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.shown)
            self.shown = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix_str(f"loss {logs['loss']:.4f}", refresh=False)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # The run's summary has the evaluations before and after it; the Trainer's own at the last step is the latter.
        if self.bar is not None and metrics and state.global_step < state.max_steps:
            self.bar.write(f"{self.label}: step {state.global_step}: {evaluation_line(metrics)}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def evaluation_line(metrics: dict) -> str:
    """An evaluation's metrics (transformers' "eval_" names) as words: validation loss, and DPO's reward accuracy
    and margin when present."""
    parts = [f"validation loss {metrics['eval_loss']:.4f}"]
    if "eval_rewards/accuracies" in metrics:
        parts.append(f"reward accuracy {metrics['eval_rewards/accuracies']:.3f}")
    if "eval_rewards/margins" in metrics:
        parts.append(f"reward margin {metrics['eval_rewards/margins']:.4f}")
    return ", ".join(parts)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside the block the libraries print nothing of their own: no "Loading weights" bars from transformers (the
    run's bar is the one shown), and none of the FutureWarnings about transformers 5's renamed properties that peft
    and TRL still call (`is_gradient_checkpointing` and the like)."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`\w+` is deprecated and will be removed in v6",
                                    category=FutureWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
