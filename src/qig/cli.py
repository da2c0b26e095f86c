"""The ``qig`` command line: one subcommand per module in ``qig.commands``.

    qig eval --limit 200
    qig world eval --output data/eval --n 1000 --seed 7

Bad input prints one line (``error: ...``) and exits with 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from qig.errors import QigError

# Each module has register(subparsers) -> parser, setting ``func(args) -> int``.
COMMANDS = ("world", "eval", "quantize", "inspect", "models", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qig", description="Post-training quantization of vision-language models")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"qig.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        # Library chatter (e.g. transformers' backend notices) is not for users of the CLI.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.getLogger("transformers").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QigError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
