"""Every family streamed from disk (``decoder="disk"``) writes the same bits as when it is loaded whole."""

import pytest
import torch
from _families import build
from _tensors import model_tensors, same
from test_real_families import calibration
from transformers import AutoModelForImageTextToText

import qig
from qig.loading import load_streamed
from qig.methods.config import make_config
from qig.models.checkpoint import STREAMED
from qig.runs import write_output


@pytest.mark.parametrize("name", ["llava-1.5", "qwen2-vl", "qwen3-vl", "gemma3"])
def test_a_streamed_run_writes_the_bits_of_an_in_memory_run(name, tmp_path):
    model, proc = build(name)
    model.save_pretrained(tmp_path / "model")  # the processor stays in memory (some need torchvision to load)
    outs, searches = {}, {}
    for decoder in ("memory", "disk"):
        if decoder == "disk":
            m = load_streamed(tmp_path / "model", AutoModelForImageTextToText, torch.float32)
        else:
            m = AutoModelForImageTextToText.from_pretrained(tmp_path / "model", dtype=torch.float32)
        assert (getattr(m, STREAMED, None) is not None) == (decoder == "disk")  # the decoder layers read from disk
        config = make_config("awq", wbits=4, group_size=32, n_grid=4)
        result = qig.quantize(m.eval(), config, calibration(m, proc), progress=False, work_dir=tmp_path / decoder)
        outs[decoder] = tmp_path / f"out-{decoder}"
        write_output(outs[decoder], m, None, result, {})
        searches[decoder] = result.tensors()
    assert same(model_tensors(outs["memory"]), model_tensors(outs["disk"]))
    assert same(searches["memory"], searches["disk"])
    assert (outs["memory"] / "config.json").read_text() == (outs["disk"] / "config.json").read_text()
    layers = model.config.get_text_config().num_hidden_layers
    assert len(list(outs["disk"].glob("model-*-of-*.safetensors"))) == layers + 1  # the rest, then one per layer
    reloaded = AutoModelForImageTextToText.from_pretrained(outs["disk"], dtype=torch.float32)
    whole = AutoModelForImageTextToText.from_pretrained(outs["memory"], dtype=torch.float32)
    assert same(reloaded.state_dict(), whole.state_dict())
