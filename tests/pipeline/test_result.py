"""QuantizationResult: one dataclass for the pipeline and qig.quantize; what save() writes."""

import json

import torch
from _tiny import tiny_llava
from safetensors.torch import load_file

import qig
from qig.methods import RTNConfig
from qig.pipeline import QuantizationResult


def test_quantize_returns_the_pipelines_result_and_save_keeps_the_quantized_state(tmp_path):
    assert qig.QuantizationResult is QuantizationResult is qig.api.QuantizationResult
    result = qig.quantize(tiny_llava(), RTNConfig(wbits=4, group_size=64), progress=False)
    assert isinstance(result, QuantizationResult)
    result.save(tmp_path)
    tensors = load_file(tmp_path / "search.safetensors")
    assert sorted(tensors) == sorted(f"quantized.{k}.{f}" for k in result.quantized for f in ("scale", "zero"))
    assert torch.equal(tensors["quantized.1.mlp.down_proj.scale"], result.quantized["1.mlp.down_proj"]["scale"])
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["config"] == result.config.to_dict() and saved["groups"] == []
