"""Everything checkable is checked before the model is loaded: output locations, devices, formats, options."""

import pytest
import torch
from _cli import run_cli

import qig.loading


@pytest.fixture
def no_loading(monkeypatch):
    """Loading the model fails the test: the refusal must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(qig.loading, "load_model_and_processor", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "--method", "gptq", "--act-order", "--format", "compressed-tensors"], "drop --act-order"),
        (["quantize", "--method", "awq", "--device", "cuda:7"], "requested but CUDA is not available"),
        (["quantize", "--method", "awq", "--output", "{file}/o"], "is a file, not a folder"),
        (["quantize", "--method", "awq", "--output", "{file}"], "is a file, not a folder"),
        (["eval", "--device", "cuda"], "requested but CUDA is not available"),
        (["eval", "--batch-size", "0"], "batch_size 0 is not supported; use an integer >= 1"),
        (["eval", "--json", "{dir}"], "is a folder, not a file"),
        (["export", "--input", "{dir}", "--output", "{file}"], "is a file, not a folder"),
        (["inspect", "--samples", "2", "--output", "{file}/maps"], "is a file, not a folder"),
        (["world", "calib", "--output", "{file}"], "is a file, not a folder"),
    ],
    ids=[
        "act-order-ct",
        "quantize-cuda",
        "output-under-file",
        "output-is-file",
        "eval-cuda",
        "eval-batch",
        "eval-json-dir",
        "export-output-file",
        "inspect-output",
        "world-output",
    ],
)
def test_refused_before_loading(no_loading, tmp_path, capsys, argv, message):
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    argv = [a.format(file=tmp_path / "f", dir=tmp_path / "d") for a in argv]
    if argv[0] in ("quantize", "inspect") and "--output" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]  # no temp sibling left
