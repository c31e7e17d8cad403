"""The `loradock` command: one parser whose subcommands each package defines with its own parser and handler.

    loradock generate | serve      serve/commands.py
    loradock train | eval | demo   train/commands.py
    loradock loadtest              loadtest/loadtest.py

`python -m loradock ...` runs it too (`__main__.py`), and so does `torchrun ... -m loradock train ...`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import transformers
import yaml

from .adapters.manager import UnknownAdapter
from .loadtest.loadtest import add_loadtest_parser
from .serve.commands import add_generate_parser, add_serve_parser
from .serve.engine import RequestError
from .serve.models.loader import ModelLoadError
from .train.commands import add_demo_parser, add_eval_parser, add_train_parser

SUBCOMMANDS = (add_generate_parser, add_serve_parser, add_train_parser, add_demo_parser, add_eval_parser,
               add_loadtest_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loradock", description="Serve many LoRA adapters on one quantized base model."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(commands)
    return parser


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv; if it names --config, use that YAML as defaults and parse again so flags win."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    subparser = parser._subparsers._group_actions[0].choices[args.command]  # noqa: SLF001 - argparse has no API
    known = {option.lstrip("-").replace("-", "_"): action.dest for action in subparser._actions  # noqa: SLF001
             for option in action.option_strings if option.startswith("--")}
    try:
        with open(args.config, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"--config {args.config}: {exc}")
    if not isinstance(values, dict):
        parser.error(f"--config {args.config}: expected a mapping of option names to values")
    defaults = {}
    for key, value in values.items():
        option = str(key).replace("-", "_")
        if option not in known or option in ("config", "help"):
            parser.error(f"--config {args.config}: unknown option {key!r}")
        defaults[known[option]] = value
    subparser.set_defaults(**defaults)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = apply_config_file(build_parser(), argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        transformers.utils.logging.disable_progress_bar()
        # bitsandbytes, imported on the CPU, tries to fetch a kernel from the Hub and warns when it cannot; it falls
        # back to its own, and loradock never downloads: not worth a warning on every run
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return args.handler(args)
    except (ModelLoadError, RequestError, UnknownAdapter, ValueError) as exc:
        print(f"loradock: error: {exc}", file=sys.stderr)
        return 2
