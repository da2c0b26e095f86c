"""Loading a model folder: dtype, activation quantizers of a W-A folder, and refusals."""

import json

import pytest
import torch
from _cli import run_cli

from qig.errors import QigError
from qig.loading import activation_note, load_model_and_processor


def test_a_folder_loads_in_float32_or_its_own_dtype(model_dir, tmp_path):
    model, processor = load_model_and_processor(model_dir)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert processor.tokenizer is not None
    model.to(torch.float16).save_pretrained(tmp_path / "half")
    processor.save_pretrained(tmp_path / "half")
    half, _ = load_model_and_processor(tmp_path / "half", dtype="auto")
    assert next(half.parameters()).dtype == torch.float16


def test_a_weight_activation_folder_gets_its_activation_quantizers_back(model_dir, tmp_path):
    out = tmp_path / "w8a8"
    argv = ["quantize", "--model", model_dir, "--method", "rtn", "--wbits", 8, "--abits", 8]
    assert run_cli(*argv, "--output", out, "--no-progress") == 0
    assert "per-token symmetric 8-bit" in activation_note(load_model_and_processor(out)[0])
    assert activation_note(load_model_and_processor(out, activation_quantizers=False)[0]) is None
    assert activation_note(load_model_and_processor(model_dir)[0]) is None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"abits": 3}, "abits must be an integer from 4 to 16, got 3"),
        ("w8a8", "abits must be an integer from 4 to 16, got None"),
    ],
    ids=["abits-out-of-range", "not-an-object"],
)
def test_a_bad_quantization_entry_names_the_fix(model_dir, tmp_path, entry, message):
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["qig_quantization"] = entry
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QigError, match=message):
        load_model_and_processor(folder)


def test_remote_code_needs_consent(model_dir, tmp_path):
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_x.XModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QigError, match="ships its own modelling code .modeling_x.XModel.; qig runs it only with"):
        load_model_and_processor(folder)
