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
    code, _, err = _run(
        capsys, *("eval", "--model", str(model), "--limit", "2", "--reference", "none"), "--model-offload", "auto"
    )
    assert code == 2 and "Traceback" not in err
    assert f"{weights} is not a readable safetensors file: its header length" in err  # read to size the decoder


def test_eval_bad_limit(capsys):
    code, _, err = _run(capsys, "eval", "--limit", "0")
    assert code == 2 and "limit 0 is not supported; use an integer >= 1" in err


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


def _temps(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_world_output_is_a_file(tmp_path, capsys):
    (tmp_path / "c").write_text("x")
    code, _, err = _run(capsys, "world", "calib", "--output", str(tmp_path / "c"), "--n", "3", "--overwrite")
    assert code == 2 and "is a file, not a folder" in err and err.count("\n") == 1


def test_world_output_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = _run(capsys, "world", "calib", "--output", str(tmp_path / "f" / "c"), "--n", "3")
    assert code == 2 and f"{tmp_path / 'f'} is a file, not a folder" in err and "Traceback" not in err


def test_eval_json_into_a_folder_is_refused_before_the_run(tmp_path, capsys):
    code, stdout, err = _run(capsys, "eval", "--limit", "2", "--json", str(tmp_path))
    assert code == 2 and "is a folder, not a file" in err and stdout == ""


def test_world_no_space_left_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from qig.embedded import world

    def full(image):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(world, "png_bytes", full)
    out = tmp_path / "c"
    code, _, err = _run(capsys, "world", "calib", "--output", str(out), "--n", "3")
    assert code == 2 and err.startswith(f"error: could not write {out}: no space left on device; ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and _temps(out) == []


@pytest.mark.parametrize(
    "stop, code, word",
    [
        pytest.param(KeyboardInterrupt, 130, "interrupted", id="SIGINT"),
        pytest.param("Terminated", 143, "terminated", id="SIGTERM"),
    ],
)
def test_a_stop_while_writing_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, stop, code, word):
    import signal

    from qig import cli
    from qig.embedded import world

    stop = getattr(cli, stop) if isinstance(stop, str) else stop

    def stopped(image):
        raise stop

    monkeypatch.setattr(world, "png_bytes", stopped)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out = tmp_path / "c"
    got, _, err = _run(capsys, "world", "calib", "--output", str(out), "--n", "3")
    assert got == code and err == f"{word}; nothing was written to {out}\n"
    assert not out.exists() and _temps(out) == []
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # main put them back


def test_an_ignored_signal_stays_ignored(tmp_path, capsys, monkeypatch):
    import signal

    from qig.embedded import world

    seen, real = [], world.png_bytes

    def spy(image):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real(image)

    monkeypatch.setattr(world, "png_bytes", spy)
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a parent may have set it (nohup, a background job)
    try:
        code, _, _ = _run(capsys, "world", "calib", "--output", str(tmp_path / "c"), "--n", "1")
        assert code == 0 and seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
