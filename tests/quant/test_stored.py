"""The kept quantizer parameters: their names in search.safetensors, and the old gptq. prefix still read."""

import pytest
import torch

from qig.quant import stored


def _state():
    return {
        "0.self_attn.q_proj": {"scale": torch.rand(4, 2), "zero": torch.zeros(4, 2)},
        "1.mlp.down_proj": {"scale": torch.rand(4, 1), "zero": torch.ones(4, 1), "g_idx": torch.arange(8)},
    }


def test_round_trip_ignores_other_entries():
    state = _state()
    tensors = {**stored.to_tensors(state), "scales.0.attn_in": torch.ones(3), "roles": torch.zeros(2)}
    back = stored.from_tensors(tensors)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k][f], v) for k, p in state.items() for f, v in p.items())


@pytest.mark.parametrize("prefix", ["gptq.", "quantized."], ids=["old-gptq-prefix", "current-prefix"])
def test_both_prefixes_are_read(prefix):
    tensors = {k.replace("quantized.", prefix, 1): v for k, v in stored.to_tensors(_state()).items()}
    assert stored.from_tensors(tensors).keys() == _state().keys()
