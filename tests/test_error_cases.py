"""Every case of ``tests/error_cases.py`` through ``qig.cli.main``; and docs/errors.md is what they print now.

Each case: its exit code, its message on one line of stderr (argparse's own
refusals: on the last line, under the usage), no traceback, and no output or
temporary folder left behind.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from error_cases import CASES, error_line, run_case

ROOT = Path(__file__).resolve().parents[1]


def _param(case):
    marks = [pytest.mark.xfail(strict=False, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_error_case(case, tmp_path, capsys):
    outcome = run_case(case, tmp_path, capture=False)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert outcome.code == case.code, err
    line = error_line(err)
    if case.by_argparse:
        assert line.startswith(f"qig {case.argv[0]}: error: ") or line.startswith("qig: error: "), err
    else:
        assert err.strip() == line and line.startswith("error: "), f"not one error line:\n{err}"
    assert case.message in line
    assert outcome.left == [], f"left behind: {outcome.left}"


def test_case_ids_are_unique_and_every_command_has_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert {c.argv[0] for c in CASES} >= {"quantize", "eval", "export", "inspect", "world"}


def test_docs_errors_md_is_what_the_cases_print():
    spec = importlib.util.spec_from_file_location("errors_table", ROOT / "scripts" / "errors_table.py")
    errors_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(errors_table)
    written = (ROOT / "docs" / "errors.md").read_text()
    assert written == errors_table.render(), (
        "docs/errors.md is out of date with tests/error_cases.py or the messages; regenerate it: "
        ".venv/bin/python scripts/errors_table.py"
    )
