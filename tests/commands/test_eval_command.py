"""``qig eval``: a run is scored against the model it was quantized from, for every family's chat template."""

import json
import shutil

import pytest
from _cli import run_cli


def _save_family(name, folder):
    from models._families import build

    model, proc = build(name)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def _quantize(source, out):
    argv = ["quantize", "--model", source, "--method", "rtn", "--wbits", 4, "--group-size", 32]
    assert run_cli(*argv, "--output", out, "--no-progress") == 0
    return out


def _eval(capsys, *argv):
    capsys.readouterr()
    code = run_cli("eval", "--limit", 4, "--batch-size", 2, *argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("family", ["llava-1.5", "gemma3"], ids=["llava-1.5", "gemma3"])
def test_a_run_is_scored_against_its_own_source_model(family, tmp_path, capsys):
    source = _save_family(family, tmp_path / "source")
    run = _quantize(source, tmp_path / "run")
    code, out, err = _eval(capsys, "--model", run, "--json", tmp_path / "eval.json")
    assert code == 0, err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["reference"] == str(source)
    fidelity = report["fidelity"]
    assert 0 <= fidelity["agreement"] <= 1
    assert 0 <= fidelity["kl"] < float("inf")
    assert "mean KL" in out


def test_a_folder_that_is_not_a_run_has_no_reference(model_dir, tmp_path, capsys):
    code, out, _ = _eval(capsys, "--model", model_dir, "--json", tmp_path / "eval.json")
    assert code == 0
    assert "fidelity" not in json.loads((tmp_path / "eval.json").read_text())
    assert f"no reference: {model_dir} is not a qig run" in out
    # an explicit reference still works
    code, out, _ = _eval(capsys, "--model", model_dir, "--reference", model_dir)
    assert code == 0 and "agreement with reference 100.0%" in out


def test_a_removed_source_model_is_one_line_error(model_dir, tmp_path, capsys):
    source = shutil.copytree(model_dir, tmp_path / "source")
    run = _quantize(source, tmp_path / "run")
    shutil.rmtree(source)
    code, _, err = _eval(capsys, "--model", run)
    assert code == 2
    assert f"the source model of {run}, {source}, no longer exists" in err
    assert "--reference none" in err and "--reference DIR" in err
    code, out, _ = _eval(capsys, "--model", run, "--reference", "none")
    assert code == 0 and "agreement" not in out
