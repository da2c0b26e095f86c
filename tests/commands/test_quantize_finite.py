"""``qig quantize`` refuses non-finite input with one line and exit 2, and writes nothing (no temporary folder)."""

import math
import shutil

import pytest
import torch
from _cli import run_cli
from safetensors.torch import load_file, save_file


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _nothing_written(folder, name="o") -> bool:
    return not (folder / name).exists() and not list(folder.glob(f".{name}.*"))


@pytest.fixture(scope="module")
def corrupt_model_dir(model_dir, tmp_path_factory):
    """The tiny LLaVA with one NaN in layer 1's down_proj (as saved: language_model.model.layers...)."""
    path = tmp_path_factory.mktemp("corrupt") / "model"
    shutil.copytree(model_dir, path)
    tensors = load_file(path / "model.safetensors")
    tensors["language_model.model.layers.1.mlp.down_proj.weight"][3, 7] = math.nan
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["--method", "rtn", "--wbits", "3"],
        ["--method", "awq", "--wbits", "3", "--calib", "embedded", "--n-samples", "2", "--n-grid", "3"],
    ],
    ids=["rtn", "awq"],
)
def test_a_nan_in_a_decoder_weight_is_refused(corrupt_model_dir, tmp_path, capsys, argv):
    assert run_cli("quantize", "--model", corrupt_model_dir, *argv, "--no-progress", "--output", tmp_path / "o") == 2
    line = _error_line(capsys)
    assert "model.language_model.layers.1.mlp.down_proj.weight holds NaN or inf values; the checkpoint is" in line
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"scales.1.mlp_in": torch.ones(128).index_fill(0, torch.tensor([9]), math.nan)}, "layer 1 mlp_in: 1 of its"),
        ({"scales.1.mlp_in": torch.zeros(128)}, "layer 1 mlp_in: 128 of its 128 scales are zero or negative"),
        ({"scales.0.attn_in": -torch.ones(128)}, "layer 0 attn_in: 128 of its 128 scales are zero or negative"),
        ({"scales.1.mlp_in": torch.ones(64)}, "layer 1 mlp_in have 64 channels, but the group's linears take 128"),
        ({"scales.abc.attn_in": torch.ones(128)}, "key 'scales.abc.attn_in' is not scales.<layer>.<group>"),
        ({"scales.0": torch.ones(128)}, "key 'scales.0' is not scales.<layer>.<group>"),
        ({"scales.7.mlp_in": torch.ones(128)}, "saved scales name groups this model does not have: layer 7 mlp_in"),
    ],
    ids=["nan", "zero", "negative", "wrong-length", "layer-not-an-int", "no-group", "no-such-layer"],
)
def test_bad_saved_scales_are_refused(model_dir, tmp_path, capsys, tensors, message):
    scales = tmp_path / "run" / "search.safetensors"
    scales.parent.mkdir()
    save_file(tensors, scales)
    argv = ["--model", model_dir, "--scales", scales, "--no-progress", "--output", tmp_path / "o"]
    assert run_cli("quantize", *argv) == 2
    assert message in _error_line(capsys)
    assert _nothing_written(tmp_path)


def _nan_after_rtn(monkeypatch):
    """RTN writes a NaN into the weights it quantized (a stand-in for a quantizer that overflows)."""
    import qig.pipeline.finish as finish

    real = finish.rtn_

    def rtn_(linears, spec):
        params = real(linears, spec)
        linears["mlp.up_proj"].weight.data[0, 0] = math.nan
        return params

    monkeypatch.setattr(finish, "rtn_", rtn_)
    return "quantized model's tensor model.language_model.layers.0.mlp.up_proj.weight holds NaN or inf"


def _nan_in_vision_tower(monkeypatch):
    """A NaN outside the decoder: rtn runs no calibration, so only the last check before writing sees it."""
    import qig.loading

    real = qig.loading.load_model_and_processor

    def load(*args, **kwargs):
        model, processor = real(*args, **kwargs)
        model.model.vision_tower.head.mlp.fc2.bias.data[0] = math.inf
        return model, processor

    monkeypatch.setattr(qig.loading, "load_model_and_processor", load)
    return "quantized model's tensor model.vision_tower.head.mlp.fc2.bias holds NaN or inf"


@pytest.mark.parametrize("corrupt", [_nan_after_rtn, _nan_in_vision_tower], ids=["quantizer", "vision-tower"])
@pytest.mark.parametrize("fmt", [None, "fake-quant"], ids=["run-folder", "export"])
def test_nothing_non_finite_reaches_the_output(model_dir, tmp_path, capsys, monkeypatch, corrupt, fmt):
    message = corrupt(monkeypatch)
    argv = ["--model", model_dir, "--method", "rtn", *(["--format", fmt] if fmt else []), "--output", tmp_path / "o"]
    assert run_cli("quantize", *argv, "--no-progress") == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert message in line and "nothing was written to" in line
    # no output, no temporary folder beside it; only the finished layers, kept for --resume (and said so)
    assert [p.name for p in tmp_path.iterdir()] == ["o.partial"]
    assert f"kept in {tmp_path / 'o.partial'}; run the same command with --resume" in err
