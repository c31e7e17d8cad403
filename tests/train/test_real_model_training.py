"""The bundled trainer on the real default model, SmolLM2-135M-Instruct, then the server: a short run teaches the
demo's sentiment format, and the server answers with the new adapter exactly as PEFT does.

Cost on 2 idle cores: about 40 s (the model loaded three times: trainer, server, PEFT; 6 steps of 8 rows of about
50 tokens; 8 short answers through the server and 4 from PEFT). The model build (about 20 s) is shared with
tests/serve/test_default_model.py through the session's cache.
"""

from __future__ import annotations

import openai
from server_support import MODEL_NAME, ServerThread
from support import peft_greedy
from transformers import AutoTokenizer

from loradock.serve.models.source import resolve_model_path
from loradock.train.config import TrainConfig
from loradock.train.tasks import TASKS, make_split, write_rows
from loradock.train.trainer import train

SENTIMENT = next(task for task in TASKS if task.name == "sentiment")
STEPS, BATCH, MAX_TOKENS = 6, 8, 8


def test_a_short_run_on_the_real_model_teaches_the_format_and_serves_as_peft_does(tmp_path):
    model = resolve_model_path(None)  # built once per session in the cache tests/conftest.py points at
    split = make_split(SENTIMENT, seed=0, train=STEPS * BATCH, validation=4, test=4)
    config = TrainConfig(data=write_rows(split.train, tmp_path / "train.jsonl"),
                         eval=write_rows(split.validation, tmp_path / "validation.jsonl"),
                         output=tmp_path / "adapters" / "sentiment", model=str(model), max_steps=STEPS,
                         batch_size=BATCH, lr=3e-3, scheduler="constant", warmup=0, rank=8, alpha=16, dropout=0.0,
                         eval_steps=STEPS + 1, quiet=True)
    report = train(config).report
    assert report["eval_after"]["loss"] < report["eval_before"]["loss"] / 4

    messages = [[{"role": "user", "content": example.prompt}] for example in split.test]
    with ServerThread(model, adapters_dir=tmp_path / "adapters", max_model_len=256) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        answers = {name: [client.chat.completions.create(model=name, messages=chat, max_tokens=MAX_TOKENS,
                                                         temperature=0).choices[0].message.content
                          for chat in messages]
                   for name in (MODEL_NAME, "sentiment")}
    assert all(answer in ("SENTIMENT: positive", "SENTIMENT: negative") for answer in answers["sentiment"]), answers
    assert not any(answer.startswith("SENTIMENT") for answer in answers[MODEL_NAME]), answers

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
               for chat in messages]
    expected = peft_greedy(model, config.output, prompts, MAX_TOKENS)
    assert answers["sentiment"] == [tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]
