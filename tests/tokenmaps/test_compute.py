"""Token weights without quantizing: the model is untouched, and the weights are the methods' own."""

import pytest
import torch
from _tiny import calibration, processor, tiny_llava

import qig
from qig.errors import QigError
from qig.methods import QIGConfig
from qig.tokenmaps import compute_token_maps, resolve_layers


def test_resolve_layers():
    assert resolve_layers("0,-1", 6) == [0, 5]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers(None, 1) == [0]
    with pytest.raises(QigError, match="layer 7 does not exist"):
        resolve_layers("7", 6)
    with pytest.raises(QigError, match="comma-separated integers"):
        resolve_layers("first", 6)


def test_weights_come_without_touching_the_model_and_match_a_real_run():
    model = tiny_llava(outliers=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration(3)
    maps = compute_token_maps(model, processor(), calib, layers="-1", wbits=3, group_size=32, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert maps.methods == ["awq", "mbq", "qig"] and maps.layers == [0, 1] and maps.shown == [1]
    real = calib.roles != 0
    for key, w in maps.weights.items():
        assert w.shape == calib.roles.shape and bool((w[~real] == 0).all()), key
    assert torch.allclose(maps.weights[("qig", 0, "attn_in")].sum(-1), torch.ones(3))
    # the first group sees the same streams as a QIG run, so the weights are the run's
    result = qig.quantize(model, QIGConfig(wbits=3, group_size=32, n_grid=2), calib, progress=False)
    assert torch.allclose(result.token_weights(0, "attn_in"), maps.weights[("qig", 0, "attn_in")])
