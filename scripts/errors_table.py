"""Write docs/errors.md: what ``qig`` says to each case of tests/error_cases.py, as it says it now.

    .venv/bin/python scripts/errors_table.py           # rewrite docs/errors.md
    .venv/bin/python scripts/errors_table.py --check   # exit 1 if docs/errors.md is out of date

Every case runs in-process (``qig.cli.main``) in a fresh temporary folder,
shown as TMP in the table. A case gets a row when it exits with its code and
its error line holds its message; one that does not yet (a fix is pending,
the case is marked xfail) has none until it does. tests/test_error_cases.py
fails when the page differs from what this script would write, so a changed
message, case or fix means a rerun.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "errors.md"

HEADER = """# Errors

What `qig` answers to bad input: one line on stderr, starting with `error:`,
and exit code 2; nothing is written (no output folder, no temporary one).
`--debug` shows the traceback instead. Options argparse itself refuses (an
unknown flag, a value that is not one of the choices, a missing required
flag) also exit with 2, after the command's usage. An interrupted run exits
with 130 (Ctrl-C) or 143 (SIGTERM).

This page is generated from the cases in `tests/error_cases.py` by
`scripts/errors_table.py`; do not edit it by hand. `TMP` stands for the
folder each case ran in. After changing a message or a case, regenerate it:

    .venv/bin/python scripts/errors_table.py

`tests/test_error_cases.py` runs every case and fails while this page is out
of date.

| command | input | exit code | message |
|---|---|---|---|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def render() -> str:
    """The page, from running every case that is not marked xfail."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from error_cases import CASES, TMP, TMP_PLACEHOLDER, error_line, run_case, shown
    finally:
        sys.path.remove(str(ROOT / "tests"))

    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory(prefix="qig-errors-") as tmp:
            try:
                outcome = run_case(case, Path(tmp))
            except Exception:  # a case whose fix is pending (xfail) may still escape with a traceback
                continue
            line = error_line(outcome.stderr)
            message = shown(line, Path(tmp))
        if outcome.code != case.code or case.message not in line:
            continue  # not what the case expects (yet): no row until it is
        argv = " ".join(a.replace(TMP, TMP_PLACEHOLDER) for a in ("qig", *case.argv))
        rows.append(f"| {case.command} | {_cell(case.input)}<br>{_code(argv)} | {outcome.code} | {_code(message)} |")
    return HEADER + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/errors.md is up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if DOCS.read_text() != text:
            print(f"{DOCS} is out of date; run scripts/errors_table.py", file=sys.stderr)
            return 1
        return 0
    DOCS.write_text(text)
    print(f"wrote {DOCS.relative_to(ROOT)} ({text.count(chr(10)) - HEADER.count(chr(10))} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
