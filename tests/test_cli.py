"""CLI error paths: one clear line, exit 2, no traceback; and the happy path of eval/world."""

import json
import shutil

import pytest

from qig.cli import main
from qig.embedded import default_model_dir


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_missing_folder(tmp_path, capsys):
    code, _, err = _run(capsys, "eval", "--model", str(tmp_path / "nope"), "--limit", "2")
    assert code == 2
    assert err.startswith("error: ") and "does not exist" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_eval_model_is_a_file(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    code, _, err = _run(capsys, "eval", "--model", str(tmp_path / "model.safetensors"), "--limit", "2")
    assert code == 2
    assert err.startswith("error: ") and "is a file, not a folder" in err and err.count("\n") == 1


def test_eval_not_an_lvlm(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    code, _, err = _run(capsys, "eval", "--model", str(tmp_path), "--limit", "2")
    assert code == 2 and "without a vision tower" in err


def test_eval_corrupt_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = _run(capsys, "eval", "--model", str(tmp_path), "--limit", "2")
    assert code == 2 and "not valid JSON" in err


def test_eval_corrupt_weights(tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(default_model_dir(), model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(b"garbage" * 10)
    code, _, err = _run(capsys, "eval", "--model", str(model), "--limit", "2", "--reference", "none")
    assert code == 2 and "could not load" in err and "Traceback" not in err


def test_eval_bad_limit(capsys):
    code, _, err = _run(capsys, "eval", "--limit", "0")
    assert code == 2 and "--limit must be positive" in err


def test_debug_shows_the_traceback(tmp_path):
    from qig.errors import QigError

    with pytest.raises(QigError):
        main(["--debug", "eval", "--model", str(tmp_path / "nope")])


def test_eval_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, _ = _run(capsys, "eval", "--limit", "16", "--json", str(out))
    assert code == 0 and "overall" in stdout
    rep = json.loads(out.read_text())
    assert rep["n"] == 16 and 0.0 <= rep["accuracy"] <= 1.0 and "per_type" in rep


def test_world_writes_and_refuses_existing(tmp_path, capsys):
    code, stdout, _ = _run(capsys, "world", "calib", "--output", str(tmp_path / "c"), "--n", "3")
    assert code == 0 and (tmp_path / "c" / "data.json").is_file()
    code, _, err = _run(capsys, "world", "calib", "--output", str(tmp_path / "c"), "--n", "3")
    assert code == 2 and "--overwrite" in err
