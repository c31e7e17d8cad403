"""DPO: preference rows, encoded as the server tokenizes them, trained on LoRA with TRL's DPOTrainer.

Rows, one JSON object per line:

    {"prompt": "...", "chosen": "...", "rejected": "..."}
    {"messages": [...the conversation so far...], "chosen": "...", "rejected": "..."}

Each reply is encoded by train/data.py exactly as the SFT row with that reply would be: the prompt as
/v1/completions tokenizes it (the conversation as /v1/chat/completions renders it, the assistant's turn opened),
then the reply and the token that ends it (EOS after a completion, the template's turn end after an assistant
turn). TRL would tokenize text its own way, so it gets the token ids (prompt_ids, chosen_ids, rejected_ids).

The reference is TRL's for a PeftModel without a ref_model: the policy as it starts, with no second copy of the
base. For a fresh adapter (LoRA B = 0) that is the base; from --init-adapter it is a frozen copy of that adapter's
weights, TRL's "ref" adapter, which is dropped before export. TRL turns dropout off while it trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .data import IGNORE, BadRow, DataError, Example, RowEncoder, check_row, drop_too_long, encode_row, read_rows

REFERENCE_ADAPTER = "ref"  # TRL's name for the frozen copy of a pretrained adapter


@dataclass(frozen=True)
class Pair:
    """One preference row as token ids: the prompt, then each reply with its end token."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str  # "file:line"

    @property
    def tokens(self) -> int:
        """The longer of the two sequences."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    def features(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids}


def check_pair(row: object) -> str | None:
    """What is wrong with a preference row's shape, or None."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, not {type(row).__name__}"
    if ("prompt" in row) == ("messages" in row):
        return 'a preference row has "prompt" or "messages" (one of them), "chosen" and "rejected"'
    if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
        return '"chosen" and "rejected" must be strings'
    if row["chosen"] == row["rejected"]:
        return '"chosen" and "rejected" are the same: nothing to prefer'
    problem = check_row(_sft_row(row, row["chosen"]))
    if problem is None and "messages" in row and row["messages"][-1]["role"] == "assistant":
        return "the conversation must end before the reply: its last message is the assistant's"
    return problem


def _sft_row(row: dict, reply: str) -> dict:
    """The SFT row that trains `reply` after the row's prompt or conversation."""
    if "prompt" in row:
        return {"prompt": row["prompt"], "completion": reply}
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return {"messages": messages}  # check_row says what is wrong
    return {"messages": [*messages, {"role": "assistant", "content": reply}]}


def encode_pair(encoder: RowEncoder, row: object, source: str) -> Pair:
    """The Pair of a preference row; BadRow saying what is wrong with it."""
    problem = check_pair(row)
    if problem is not None:
        raise BadRow(problem)
    prompt, chosen = _split(encode_row(encoder, _sft_row(row, row["chosen"]), source))
    other_prompt, rejected = _split(encode_row(encoder, _sft_row(row, row["rejected"]), source))
    if prompt != other_prompt:
        raise BadRow("the prompt is tokenized differently before the chosen and the rejected reply")
    return Pair(prompt, chosen, rejected, source)


def _split(example: Example) -> tuple[list[int], list[int]]:
    """(everything before the last reply, the last reply): the reply is the trailing run of trained tokens."""
    start = max(i for i, label in enumerate(example.labels) if label == IGNORE) + 1
    return example.input_ids[:start], example.input_ids[start:]


def load_pairs(path: Path, encoder: RowEncoder, max_seq_len: int) -> tuple[list[Pair], int]:
    """Every preference row of a JSONL file encoded, and how many were left out for being longer than
    `max_seq_len` tokens. Raises DataError listing every bad row (file:line: why)."""
    pairs = read_rows(path, lambda row, source: encode_pair(encoder, row, source))
    return drop_too_long(pairs, lambda pair: pair.tokens, path, max_seq_len)


def require_pairs(pairs: list[Pair], what: str) -> None:
    """Fail before training when the length limit leaves no pair."""
    if not pairs:
        raise DataError(f"{what} has no pair left to train on: every one is longer than --max-seq-len")


def pair_stats(pairs: list[Pair]) -> dict:
    """What the report says about a set of pairs."""
    lengths = [pair.tokens for pair in pairs]
    return {"pairs": len(pairs), "prompt_tokens": sum(len(p.prompt_ids) for p in pairs),
            "chosen_tokens": sum(len(p.chosen_ids) for p in pairs),
            "rejected_tokens": sum(len(p.rejected_ids) for p in pairs), "max_tokens": max(lengths, default=0)}


def dpo_trainer(config, trainable, train: list[Pair], validation: list[Pair], arguments: dict, callbacks: list):
    """TRL's DPOTrainer on the LoRA model and the encoded pairs, with the SFT run's training arguments."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class EncodedPairTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            # TRL's hook that tokenizes text its own way: the pairs are token ids already (see the module docstring)
            return dataset

    def dataset(pairs: list[Pair]):
        return Dataset.from_list([pair.features() for pair in pairs])

    # DPOConfig turns gradient checkpointing on by default: keep the run's choice. Rows over --max-seq-len were
    # left out already, so TRL truncates nothing.
    args = DPOConfig(**{**arguments, "gradient_checkpointing": config.gradient_checkpointing}, beta=config.beta,
                     max_length=None)
    return EncodedPairTrainer(model=trainable.model, args=args, train_dataset=dataset(train),
                              eval_dataset=dataset(validation) if validation else None,
                              processing_class=trainable.tokenizer, callbacks=callbacks)


def drop_reference_adapter(model) -> None:
    """Remove TRL's frozen reference copy, so that only the trained adapter is saved."""
    if REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)


@torch.no_grad()
def preference_metrics(model, pairs: list[Pair], beta: float, pad_id: int, batch_size: int) -> dict:
    """Over `pairs`, with π the policy (the adapter on) and π_ref TRL's reference, the implicit reward
    r(y) = β · (log π(y|x) − log π_ref(y|x)) of each reply:

    loss = mean −log σ(r_chosen − r_rejected) (TRL's sigmoid DPO loss); reward_accuracy = share of pairs with
    r_chosen > r_rejected; reward_margin = mean r_chosen − r_rejected; preference_accuracy = share of pairs with
    log π(chosen|x) > log π(rejected|x), the policy's own preference (also meaningful before training, when every
    reward is 0).
    """
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import use_adapter

    collate = DataCollatorForPreference(pad_token_id=pad_id)
    reference = REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config else None  # None: the adapter off
    was_training = model.training
    model.eval()
    policy_logps, reference_logps = [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate([pair.features() for pair in pairs[start : start + batch_size]])
        policy_logps.append(_reply_logps(model, batch))
        with use_adapter(model, reference):
            reference_logps.append(_reply_logps(model, batch))
    model.train(was_training)
    policy, ref = torch.stack(_chosen_and_rejected(policy_logps)), torch.stack(_chosen_and_rejected(reference_logps))
    rewards = beta * (policy - ref)  # [2, pairs]: chosen, rejected
    margins = rewards[0] - rewards[1]
    return {
        "loss": torch.nn.functional.softplus(-margins).mean().item(),  # −log σ(x) = softplus(−x)
        "reward_accuracy": (margins > 0).float().mean().item(),
        "reward_margin": margins.mean().item(),
        "preference_accuracy": (policy[0] > policy[1]).float().mean().item(),
        "pairs": len(pairs),
    }


def _chosen_and_rejected(batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch [chosen..., rejected...] log-probabilities -> (all chosen, all rejected)."""
    halves = [batch.chunk(2) for batch in batches]
    return torch.cat([chosen for chosen, _ in halves]), torch.cat([rejected for _, rejected in halves])


def _reply_logps(model, batch: dict) -> torch.Tensor:
    """log π(reply | prompt) of every row of a collated batch: the sum over its completion tokens."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    mask = batch["completion_mask"][:, 1:].to(device)
    sums = []
    for row in range(input_ids.shape[0]):  # one row at a time: a float32 [tokens, vocab] copy is enough
        logps = torch.log_softmax(logits[row, :-1].float(), dim=-1)
        taken = logps.gather(-1, input_ids[row, 1:, None]).squeeze(-1)
        sums.append((taken * mask[row]).sum())
    return torch.stack(sums)
