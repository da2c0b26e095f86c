"""The ``qig`` command line: one subcommand per module in ``qig.commands``.

    qig eval --limit 200
    qig world eval --output data/eval --n 1000 --seed 7

Bad input prints one line (``error: ...``) and exits with 2; ``--debug``
shows the traceback. Ctrl-C (SIGINT) and SIGTERM, at any moment of a command
(its imports included), print one line (``interrupted`` / ``terminated``, and
which outputs were not written) and exit with 130 / 143; the output being
written is left as it was (its temporary folder is removed on the way out).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import traceback

from qig import fileio
from qig.errors import QigError

# The subcommands and the line ``qig --help`` shows for each. Each is a module of ``qig.commands`` whose
# ``register(parser)`` adds its flags and sets ``func(args) -> int``; only the command asked for is imported,
# so ``qig --help`` and ``qig models`` start without torch.
COMMANDS = {
    "world": "write a split of the embedded visual-QA world (PNG + LLaVA-style JSON)",
    "eval": "evaluate a model on the embedded visual-QA benchmark (or a LLaVA-style JSON)",
    "quantize": "post-training quantization (every method, WxA16 or W-A); writes a loadable model folder",
    "inspect": "token-sensitivity maps (QIG vs MBQ vs AWQ token weights) as pictures + HTML, no quantization",
    "models": "list the supported model families, their classes and what is supported",
    "export": "write a quantize run in a serving format or as fake-quant weights (qig export --help lists them)",
    "plan": "dry run on a checkpoint's config: scale groups, group size, vLLM TP degrees, vision tokens, memory",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``qig`` parser; with ``argv`` only the subcommand it names gets its flags (None: every subcommand)."""
    parser = argparse.ArgumentParser(prog="qig", description="Post-training quantization of vision-language models")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    named = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    for name, line in COMMANDS.items():
        p = sub.add_parser(name, help=line)
        if named is None or name == named:
            importlib.import_module(f"qig.commands.{name}").register(p)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt, so ``finally`` blocks and ``atomic_dir`` clean up."""


# Exit codes of the shell convention, 128 + the signal number.
STOPS = {KeyboardInterrupt: ("interrupted", 130), Terminated: ("terminated", 143)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    fileio.clear_unfinished()
    state = {"reporting": False, "stop": None}
    previous = _catch_signals(state)
    try:
        level = logging.DEBUG if debug else logging.INFO
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        if not debug:
            # Library chatter (e.g. transformers' backend notices) is not for users of the CLI.
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            logging.getLogger("transformers").setLevel(logging.ERROR)
        args = build_parser(argv).parse_args(argv)
        return int(args.func(args) or 0)
    except QigError as exc:
        if state["stop"] is not None:  # the stop turned into an error on its way out (e.g. a broken import)
            return _stopped(state, debug)
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        for note in fileio.resumable_notes():
            print(note, file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        state["stop"] = type(exc)
        return _stopped(state, debug)
    except Exception:
        if state["stop"] is None:
            raise
        return _stopped(state, debug)  # a library turned the stop into its own error (numpy's interrupted import)
    finally:
        _restore_signals(previous)


def _stopped(state: dict, debug: bool) -> int:
    """The stop's one line (and what was not written), its exit code."""
    state["reporting"] = True  # a further signal now is ignored: we are on the way out
    if debug:
        traceback.print_exc()
    word, code = STOPS[state["stop"]]
    unwritten = fileio.unfinished_outputs()
    if unwritten:
        word += f"; nothing was written to {', '.join(map(str, unwritten))}"
    print(word, file=sys.stderr)
    for note in fileio.resumable_notes():
        print(note, file=sys.stderr)
    return code


def _catch_signals(state: dict) -> dict:
    """SIGINT raises KeyboardInterrupt, SIGTERM raises Terminated; returns the previous handlers.

    A second signal during the clean-up raises again (a command that swallowed
    the first can still be stopped), except once ``main`` is reporting. A
    signal our parent set to be ignored stays ignored. Only the main thread
    may set handlers; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        if state["reporting"]:
            return
        state["stop"] = KeyboardInterrupt if signum == signal.SIGINT else Terminated
        raise state["stop"]

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(sig)
        if current is signal.SIG_IGN:
            continue  # ignored by whoever started us (a background job, nohup): it stays ignored
        previous[sig] = current
        signal.signal(sig, handler)
    return previous


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        if handler is not None:  # None: set from outside Python, cannot be put back from here
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
