"""Training data: masking, the chat template as the server renders it, the end token, bad rows, the split."""

from __future__ import annotations

import copy
import json
import logging

import pytest
from loradock.train.data import (
    IGNORE,
    DataError,
    RowEncoder,
    load_examples,
    require_labels,
    split_examples,
)

END = "<|end|>"


@pytest.fixture(scope="module")
def encoder(tokenizer):
    stop_ids = frozenset({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)})
    return RowEncoder(tokenizer, stop_ids)


def trained(example) -> list[int]:
    return [label for label in example.labels if label != IGNORE]


def write_jsonl(path, rows) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))


def test_prompt_tokens_carry_no_loss_and_eos_does(tokenizer, encoder):
    example = encoder.encode({"prompt": "def add(a, b):", "completion": "\n    return a + b"}, "x:1")
    prompt = tokenizer("def add(a, b):").input_ids  # as /v1/completions tokenizes a prompt: with <s>
    completion = tokenizer("\n    return a + b", add_special_tokens=False).input_ids
    assert example.input_ids == prompt + completion + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE] * len(prompt) + completion + [tokenizer.eos_token_id]
    assert example.labels[-1] == tokenizer.eos_token_id


def test_chat_rows_use_the_servers_rendering_and_train_only_assistant_turns(tokenizer, encoder):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    example = encoder.encode({"messages": messages}, "x:1")
    # What /v1/chat/completions feeds the model for the last turn (serve/api/chat_prompt.py) ...
    served = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert example.input_ids[: len(served)] == served
    # ... followed by the reply and the turn's end token, which the server stops on; the newline after it is not
    # trained (it is never generated).
    reply = tokenizer("Goodbye." + END, add_special_tokens=False).input_ids
    assert example.input_ids[len(served):] == reply
    assert example.labels[len(served):] == reply
    first_reply = tokenizer("Hello." + END, add_special_tokens=False).input_ids
    assert trained(example) == first_reply + reply
    assert tokenizer.decode(trained(example)) == f"Hello.{END}Goodbye.{END}"


def test_a_template_without_a_stop_token_trains_eos_after_the_turn(tokenizer, caplog):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                          "{% if add_generation_prompt %}assistant:{% endif %}"
    encoder = RowEncoder(plain, frozenset({plain.eos_token_id}))
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello"}]}
    with caplog.at_level(logging.WARNING, logger="loradock.train"):
        example = encoder.encode(row, "x:1")
    assert "no token the server stops on" in caplog.text
    assert trained(example)[-1] == plain.eos_token_id
    assert plain.decode(trained(example)[:-1]) == "  Hello\n"  # all the template writes after "assistant:"


def test_bad_rows_are_listed_with_file_and_line(tmp_path, encoder):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [
        {"prompt": "ok", "completion": " fine"},
        "{not json",
        {"prompt": "no completion"},
        "",
        {"prompt": 3, "completion": "x"},
        {"messages": [{"role": "user", "content": "no reply"}]},
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user"}]},
        ["a", "list"],
    ])
    with pytest.raises(DataError) as caught:
        load_examples(path, encoder, max_seq_len=64)
    message = str(caught.value)
    assert message.startswith(f"7 bad row(s) in {path}")
    for line, why in [(2, "not valid JSON"), (3, 'needs "prompt" and "completion"'), (5, '"prompt" must be'),
                      (6, "no assistant message"), (7, "Unsupported chat role: robot"),
                      (8, 'must be an object with string "role" and "content"'), (9, "must be a JSON object")]:
        assert f"{path}:{line}: " in message and why in message
    assert f"{path}:1:" not in message and f"{path}:4:" not in message


def test_rows_over_the_length_limit_are_left_out_and_none_left_fails(tmp_path, encoder, caplog):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"prompt": "short", "completion": " x"}, {"prompt": "a much longer prompt " * 5, "completion": " y"}])
    with caplog.at_level(logging.WARNING, logger="loradock.train"):
        examples, skipped = load_examples(path, encoder, max_seq_len=8)
    assert (len(examples), skipped) == (1, 1) and f"{path}:2" in caplog.text
    examples, skipped = load_examples(path, encoder, max_seq_len=2)
    assert (examples, skipped) == ([], 2)
    with pytest.raises(DataError, match="no token to train on"):
        require_labels(examples, str(path))


def test_the_split_is_deterministic_and_disjoint(encoder):
    examples = [encoder.encode({"prompt": f"p{i}", "completion": f" c{i}"}, f"x:{i}") for i in range(50)]
    train, held = split_examples(examples, 0.1, seed=3)
    assert (len(train), len(held)) == (45, 5)
    assert split_examples(examples, 0.1, seed=3) == (train, held)
    assert split_examples(examples, 0.1, seed=4)[1] != held
    assert {e.source for e in train}.isdisjoint(e.source for e in held)
    assert split_examples(examples[:2], 0.1, seed=0)[1] and split_examples(examples, 0.0, seed=0)[1] == []
