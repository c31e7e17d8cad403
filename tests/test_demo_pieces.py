"""The pieces of `loradock demo` (its whole run, a minute or more, checks its own 90% scores and exits 1 below them):
the bundled task data and the in-process server it queries with a mixed batch."""

from __future__ import annotations

import asyncio

from loradock.loadtest.random_adapters import write_random_adapter
from loradock.train.demo_server import BASE_NAME, Query, ask_all, running_server
from loradock.train.tasks import CATEGORIES, TASKS, make_prompts, write_rows


def test_task_data_and_the_demo_server(tmp_path, model_dir, tokenizer):
    prompts = make_prompts(seed=0, train=200, validation=20, test=30)
    assert prompts == make_prompts(seed=0, train=200, validation=20, test=30)
    sets = [set(prompts.train), set(prompts.validation), set(prompts.test)]
    assert [len(s) for s in sets] == [200, 20, 30] and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    for prompt in prompts.test:
        words = prompt.split()
        assert sorted(next(c for c, members in CATEGORIES.items() if w in members) for w in words) == sorted(CATEGORIES)
        assert [task.answer(prompt) for task in TASKS] == [next(w for w in words if w in CATEGORIES[t.category])
                                                           for t in TASKS]
    every_word = [w for members in CATEGORIES.values() for w in members]
    assert len(set(every_word)) == len(every_word)
    # Each word is one token of the demo model's tokenizer (the fixture is the same build), which is what lets a
    # LoRA on a random model learn the tasks in a few hundred steps.
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in every_word)
    row = write_rows(TASKS[0], prompts.test[:1], tmp_path / "rows.jsonl").read_text()
    assert f'"content": "{TASKS[0].answer(prompts.test[0])}"' in row

    adapters = tmp_path / "adapters"
    write_random_adapter(model_dir("llama"), adapters / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])

    async def mixed_batch():
        async with running_server(model_dir("llama"), adapters) as url:
            queries = [Query(model, text, chat) for model in (BASE_NAME, "a") for text in prompts.test[:3]
                       for chat in (True, False)]
            return await ask_all(url, queries, max_tokens=4)

    answers = asyncio.run(mixed_batch())
    assert len(answers) == 12 and all(isinstance(a, str) for a in answers)
    assert answers[:6] != answers[6:]  # the adapter changes what the model says
