"""Fuzzing the ``qig`` command line: random argv from each subcommand's real options.

The argv are built by reading ``build_parser()``'s subparsers: each flag with
a value of its kind (a choice, a number, a path), or of the wrong kind; now
and then a required flag left out, a flag given twice, an unknown flag.
``qig.cli.main`` must return 0 or 2 (argparse's own refusals: SystemExit 2),
and nothing else may escape. To stay fast, work stops where it would start:
loading a model (every ``load_model_and_processor`` qig imported) and writing
a world split raise a sentinel, which counts as "validation passed". Every
example runs in a fresh folder, which must be left as it was found.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import pytest
from _fuzz import fast_and_slow, outcome
from hypothesis import strategies as st

from qig.cli import build_parser, main
from qig.errors import QigError


class ValidationPassed(Exception):
    """Raised where the real work would start."""


SUBCOMMANDS: dict[str, argparse.ArgumentParser] = next(
    a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
)


@pytest.fixture(scope="module", autouse=True)
def _stop_before_work():
    """Loading a model and writing a split raise ValidationPassed, in every module that imported them."""
    import qig.embedded.world
    import qig.evaluate  # noqa: F401  (imports load_model_and_processor by name)
    import qig.export.writer  # noqa: F401
    import qig.loading

    def stop(*args, **kwargs):
        raise ValidationPassed

    def write_split(split, out_dir, n, seed, overwrite=False):
        qig.embedded.world.generate(split, min(n, 2), seed)  # the seed and split reach the generator
        raise ValidationPassed

    targets = {"load_model_and_processor": qig.loading.load_model_and_processor}
    with pytest.MonkeyPatch.context() as mp:
        for name, module in list(sys.modules.items()):
            if (
                name.startswith("qig")
                and getattr(module, "load_model_and_processor", None) is targets["load_model_and_processor"]
            ):
                mp.setattr(module, "load_model_and_processor", stop)
        mp.setattr(qig.embedded.world, "write_split", write_split)
        yield


# ---------------------------------------------------------------- strategies

PATHS = ["missing", "missing/deeper", "file.txt", "folder", "model", "", ".", "..", "none", "-", "ü/ß", "x" * 300]
DEVICES = ["cpu", "cuda", "cuda:0", "cuda:7", "cuda:-1", "mps", "meta", "tpu", "", "CPU", "cpu:0", "cuda:x"]
NUMBERS = ["0", "1", "2", "3", "8", "16", "64", "128", "-1", "-5", "1.5", "1e3", "nan", "inf", "", "x", "0x10"]
TEXT = ["qig", "all", "0,1", "-1", "0,-1", "1,2,3,99", "channel", "none", "true", "🙂", " "]
DEVICE_FLAGS = {"--device"}


def _values(action: argparse.Action) -> st.SearchStrategy[str]:
    """Strings for one flag: its choices or its kind, often; anything from the other pools, sometimes."""
    anything = st.sampled_from(PATHS + NUMBERS + TEXT + DEVICES)
    if action.choices is not None:
        right = st.sampled_from([str(c) for c in action.choices])
    elif action.option_strings and action.option_strings[0] in DEVICE_FLAGS:
        right = st.sampled_from(DEVICES)
    elif action.type is not None:
        huge = st.integers(-(2**70), 2**70).map(str)
        right = st.one_of(st.integers(-3, 300).map(str), st.sampled_from(NUMBERS), huge)
    else:
        right = st.sampled_from(PATHS)
    return st.one_of(*[right] * 6, anything)


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


@st.composite
def argvs(draw) -> list[str]:
    """An argv for one subcommand: some of its flags with values, required ones mostly present."""
    name = draw(st.sampled_from(sorted(SUBCOMMANDS)))
    actions = [a for a in SUBCOMMANDS[name]._actions if not isinstance(a, argparse._HelpAction)]
    argv = ["--debug", name] if draw(st.integers(0, 19)) == 0 else [name]
    required = [a for a in actions if a.required and draw(st.integers(0, 9)) > 0]  # left out now and then
    optional = [a for a in actions if not a.required]
    chosen = draw(st.lists(st.sampled_from(optional), max_size=5, unique=True)) if optional else []
    for action in required + chosen:
        if not action.option_strings:  # a positional
            argv.append(draw(_values(action)))
            continue
        flag = action.option_strings[-1]
        if not _takes_value(action):
            argv.append(flag)
        elif draw(st.integers(0, 4)) == 0:
            argv.append(f"{flag}={draw(_values(action))}")
        else:
            argv += [flag, draw(_values(action))]
    extra = draw(st.integers(0, 11))
    if extra == 0:
        argv.append("--no-such-flag")
    elif extra == 1 and len(argv) > 1:
        argv.insert(draw(st.integers(1, len(argv))), draw(st.sampled_from(argv[1:])))  # a token twice
    elif extra == 2 and argv[-1].startswith("--"):
        argv.pop()  # a flag's value, or the flag, left out
    return argv


# ---------------------------------------------------------------- the property


@contextlib.contextmanager
def _in_fresh_folder():
    """A new working folder holding a file, an empty folder and a non-model folder; removed after."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="qig-fuzz-cli-") as tmp:
        root = Path(tmp)
        (root / "file.txt").write_text("not a model\n")
        (root / "folder").mkdir()
        (root / "model").mkdir()
        (root / "model" / "config.json").write_text('{"model_type": "qwen2"}')
        os.chdir(root)
        try:
            yield root
        finally:
            os.chdir(old)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


LONG = "x" * 300

# Bugs this suite found outside its own files, fixed since: their reproducers stay as regression tests.
REGRESSIONS = {
    "negative-world-seed": [["world", "eval", "--output", "out", "--seed", "-1"]],
    "recipe-is-a-folder": [
        ["quantize", "--recipe", "folder", "--output", "out"],
        ["quantize", "--recipe", ".", "--output", "out"],
    ],
    "file-name-too-long": [
        ["world", "eval", "--output", LONG],
        ["export", "--input", "missing", "--output", LONG],
        ["export", "--input", LONG, "--output", "out"],
        ["quantize", "--method", "rtn", "--output", LONG],
        ["quantize", "--scales", LONG, "--output", "out"],
        ["quantize", "--recipe", LONG, "--output", "out"],
        ["eval", "--model", LONG],
        ["eval", "--json", LONG],
    ],
}


def main_returns_0_or_2(argv):
    """``main(argv)``: 0, 2 (one 'error:' line), argparse's exit 2, or the work reached; no other exception."""
    _check_main(argv)


def _check_main(argv: list[str]) -> None:
    debug = "--debug" in argv
    err = io.StringIO()
    with _in_fresh_folder() as root, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        before = _files(root)
        try:
            code = main(argv)
        except ValidationPassed:
            code, what = None, "work reached"
        except SystemExit as exc:  # argparse: unknown flag, bad choice, missing value
            assert exc.code == 2, f"argparse exited with {exc.code!r}"
            code, what = None, "argparse refused"
        except QigError:
            assert debug, "a QigError escaped main without --debug"
            code, what = None, "QigError (--debug)"
        else:
            what = f"exit {code}"
        outcome(f"{argv[1] if debug and len(argv) > 1 else argv[0]}: {what}")
        assert _files(root) == before, "validation wrote files"
    if code is not None:
        assert code in (0, 2), f"exit code {code!r}"
        if code == 2 and not debug:
            lines = err.getvalue().strip().splitlines()
            assert lines and lines[-1].startswith("error: ") and "Traceback" not in err.getvalue()


@pytest.mark.parametrize(
    "argv",
    [pytest.param(argv, id=f"{name}-{' '.join(argv)[:40]}") for name, cases in REGRESSIONS.items() for argv in cases],
)
def test_fixed_bugs_stay_fixed(argv):
    _check_main(argv)


test_cli, test_cli_slow = fast_and_slow(
    argv=argvs(),
    fast_examples=150,
    examples=(
        {"argv": ["world", "eval", "--output", "out", "--seed", "5"]},
        {"argv": ["eval", "--model", "missing", "--batch-size", "0"]},
        {"argv": ["eval", "--device", "cuda:x"]},
        {"argv": ["quantize", "--output", "out", "--group-size", "-3"]},
        {"argv": ["inspect", "--output", "out", "--layers", "x"]},
        {"argv": ["export", "--input", "file.txt", "--output", "folder"]},
    ),
)(main_returns_0_or_2)
