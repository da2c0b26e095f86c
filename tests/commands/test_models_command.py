"""``qig models``: every family with its classes and modes; JSON for scripts."""

import json

from _cli import run_cli

from qig.models import FAMILIES


def test_lists_every_family_with_its_classes(capsys):
    assert run_cli("models") == 0
    out = capsys.readouterr().out
    for fam in FAMILIES:
        line = next(line for line in out.splitlines() if line.startswith(fam.name + " "))
        assert all(cls in line for cls in fam.classes)
        assert ("--trust-remote-code" in line) == fam.remote_code
    assert "llama-names (fallback)" in out
    assert "to add a family" in out
    assert "Every family runs every method of qig quantize" in out


def test_json_rows_name_families_and_modes(capsys):
    assert run_cli("models", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["family"] for r in rows[:-1]] == [fam.name for fam in FAMILIES]
    for r in rows:
        assert r["modes"] == ["W-only", "W-A"]
