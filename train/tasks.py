"""The demo's bundled tasks, generated deterministically (nothing to download, nothing stored).

Every prompt is three Python words in random order: one built-in type, one verb, one noun, e.g. "path dict open".
Each adapter learns to answer with the word of its own kind ("dict", "open", "path"), so the same prompt gets a
different answer from each adapter, and the base model, never trained on this, answers none of them. The words
are single tokens of the demo model's tokenizer (trained on Python's standard library).

Why these tasks: the demo base is a randomly initialised 4-layer model. A LoRA on top learns, in a minute of CPU,
what a random network's near-uniform attention already exposes, which words occur in the prompt, but not
where they occur (measured, 200-300 steps: "reverse three words" 2%, "uppercase four letters" 0%, "sort the words"
8% held-out exact match; single-digit addition 2% on unseen pairs, the table memorised). Picking a word by its
kind needs no order and carries over to combinations never seen in training.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

CATEGORIES = {
    "type": ("int", "str", "list", "dict", "set"),
    "verb": ("open", "read", "add", "get", "copy", "check", "call", "match", "format", "start"),
    "noun": ("file", "path", "name", "line", "mode", "key", "value", "module", "method", "group", "error", "data",
             "text", "size", "code"),
}


@dataclass(frozen=True)
class Task:
    """Name the word of one category in a prompt of one word per category (chat rows: one user message, one
    assistant reply)."""

    name: str  # also the adapter's name
    category: str

    def answer(self, prompt: str) -> str:
        return next(word for word in prompt.split() if word in CATEGORIES[self.category])

    def row(self, prompt: str) -> dict:
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": self.answer(prompt)}]}


TASKS = tuple(Task(name, name) for name in CATEGORIES)


@dataclass(frozen=True)
class Prompts:
    """Three disjoint sets of prompts, the same for every task."""

    train: list[str]
    validation: list[str]
    test: list[str]  # held out: scored through the server


def make_prompts(seed: int, train: int, validation: int, test: int) -> Prompts:
    """Distinct random prompts (one word per category, shuffled), split into disjoint sets; the same seed gives
    the same prompts on every machine."""
    rng = random.Random(seed)
    wanted, seen, prompts = train + validation + test, set(), []
    while len(prompts) < wanted:
        words = [rng.choice(words) for words in CATEGORIES.values()]
        rng.shuffle(words)
        prompt = " ".join(words)
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return Prompts(prompts[:train], prompts[train : train + validation], prompts[train + validation :])


def write_rows(task: Task, prompts: list[str], path: Path) -> Path:
    """The task's JSONL rows for these prompts."""
    path.write_text("".join(json.dumps(task.row(p)) + "\n" for p in prompts), encoding="utf-8")
    return path
