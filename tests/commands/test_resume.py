"""``qig quantize --resume``: a run stopped after layer k continues to the very bits of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _cli import run_cli
from _tensors import model_tensors, same

from qig.pipeline.journal import Journal

BASE = ["--calib", "embedded", "--n-samples", 4, "--no-progress"]
CASES = {
    "awq": ["--method", "awq", "--wbits", 3, "--n-grid", 5],
    "gptq-qig": ["--method", "gptq", "--token-weights", "qig", "--wbits", 3],
    "qig-w4a8": ["--method", "qig", "--wbits", 4, "--abits", 8, "--n-grid", 5],
    "mbq-streamed": ["--method", "mbq", "--wbits", 3, "--n-grid", 5, "--model-offload", "disk"],
    "rtn": ["--method", "rtn", "--wbits", 4, "--no-progress"],
}


def argv(model_dir, out, case):
    extra = BASE if case != "rtn" else []
    return ["quantize", "--model", model_dir, *CASES[case], *extra, "--output", out]


def search_json(out):
    data = json.loads((out / "search.json").read_text())
    for g in data["groups"]:
        g.pop("seconds")  # timings differ from run to run, resumed or not
    data["method_summary"].get("gptq", {}).pop("seconds_per_layer", None)
    return data


def assert_same_run(a, b):
    assert same(model_tensors(a), model_tensors(b))
    assert (a / "search.safetensors").read_bytes() == (b / "search.safetensors").read_bytes()
    assert search_json(a) == search_json(b)
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    for name in sorted(p.name for p in a.glob("model*.safetensors")):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def crash_after(monkeypatch, layer: int):
    """Journal.save_layer stops the run (as Ctrl-C would) once layer ``layer`` is kept."""
    original = Journal.save_layer

    def save_then_stop(self, finished):
        original(self, finished)
        if finished.index == layer:
            raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "save_layer", save_then_stop)


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_stopped_after_a_layer_resumes_to_the_same_bits(case, model_dir, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert run_cli(*argv(model_dir, whole, case)) == 0
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        crash_after(m, 0)
        assert run_cli(*argv(model_dir, out, case)) == 130
    err = capsys.readouterr().err
    partial = tmp_path / "out.partial"
    assert "--resume" in err and str(partial) in err
    assert not out.exists() and Journal(partial, {}).finished() == [0]
    assert run_cli(*argv(model_dir, out, case), "--resume") == 0
    assert not partial.exists()
    assert_same_run(whole, out)


def test_resume_refuses_other_inputs_and_a_fresh_run_keeps_the_partial(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        crash_after(m, 0)
        assert run_cli(*argv(model_dir, out, "awq")) == 130
    capsys.readouterr()
    changed = [a if a != 5 else 6 for a in argv(model_dir, out, "awq")]  # --n-grid 6
    assert run_cli(*changed, "--resume") == 2
    err = capsys.readouterr().err
    assert "cannot be resumed" in err and "n_grid: 5 then, 6 now" in err
    more = [a if a != 4 else 5 for a in argv(model_dir, out, "awq")]  # --n-samples 5: other calibration data
    assert run_cli(*more, "--resume") == 2
    assert "calibration" in capsys.readouterr().err
    assert run_cli(*argv(model_dir, out, "awq")) == 2  # no --resume: the partial run is not thrown away
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert Journal(tmp_path / "out.partial", {}).finished() == [0]


def test_a_run_stopped_before_its_first_layer_finishes_leaves_no_partial_folder(model_dir, tmp_path, monkeypatch):
    def stop(self, finished):
        raise KeyboardInterrupt  # as Ctrl-C during layer 0: only the fingerprint has been written

    monkeypatch.setattr(Journal, "save_layer", stop)
    out = tmp_path / "out"
    assert run_cli(*argv(model_dir, out, "awq")) == 130
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_resume_without_a_partial_run_is_refused(model_dir, tmp_path, capsys):
    assert run_cli(*argv(model_dir, tmp_path / "none", "awq"), "--resume") == 2
    assert "no partial run to resume" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_during_a_layer_then_resume(model_dir, tmp_path):
    """A real kill -9 while layer 2 is searched: the rerun with --resume ends with the uninterrupted run's bits."""
    whole = tmp_path / "whole"
    case = [str(a) for a in argv(model_dir, whole, "awq")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "qig", *case], check=True, env=env, capture_output=True)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qig", *[str(a) for a in argv(model_dir, out, "awq")]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "out.partial"
    deadline = time.monotonic() + 600
    while not (partial / "layer-00001.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before layer 1 was kept"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    subprocess.run([*cmd, "--resume"], check=True, env=env, capture_output=True)
    assert_same_run(whole, out)
