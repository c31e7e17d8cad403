"""What the evaluation tests share: `loradock eval` run in-process, and greedy answers fetched with the official
`openai` client (independent of the code under test) to build reference files from."""

from __future__ import annotations

import argparse
import json

import openai

from loradock.train.commands import add_eval_parser


def eval_cli(*argv: str) -> int:
    """`loradock eval ARGV...` in this process (the `loradock` command wires the same parser); its exit status."""
    parser = argparse.ArgumentParser(prog="loradock")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.handler(args)


def greedy(url: str, model: str, prompt: str | list[dict], max_tokens: int) -> str:
    """The model's greedy answer, through the openai client: a completion for a string, a chat reply for messages."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    if isinstance(prompt, str):
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return reply.choices[0].text
    reply = client.chat.completions.create(model=model, messages=prompt, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content


def write_jsonl(path, rows) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
