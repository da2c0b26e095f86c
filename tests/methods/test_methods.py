"""The methods on a tiny model with outlier channels: error ordering, determinism, token weights."""

import torch
from _tiny import tiny_llava

import qig
from qig.calib import ANSWER, PROMPT, VISION
from qig.methods import AWQConfig, MBQConfig, QIGConfig, RTNConfig

SETTING = dict(wbits=3, group_size=32)


def test_search_beats_rtn_on_outlier_channels(quantized_error):
    errors = {c.name: quantized_error(c) for c in (RTNConfig(**SETTING), AWQConfig(**SETTING), QIGConfig(**SETTING))}
    assert errors["awq"] <= errors["rtn"]
    assert errors["qig"] <= errors["rtn"]


def test_two_runs_give_bit_identical_scales(calib):
    results = [qig.quantize(tiny_llava(outliers=True), QIGConfig(**SETTING), calib, progress=False) for _ in range(2)]
    a, b = (r.scales() for r in results)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(
        torch.equal(x.token_weights, y.token_weights) for x, y in zip(results[0].groups, results[1].groups, strict=True)
    )


def test_mbq_weights_follow_roles(calib):
    result = qig.quantize(tiny_llava(outliers=True), MBQConfig(**SETTING, grad_batch_size=8), calib, progress=False)
    rho = result.method_summary["rho"]
    for path, values in rho.items():
        assert min(values) >= float(torch.tensor(result.method_summary["gradient_ratio"][path]).median()) - 1e-12
    g = result.groups[0]
    roles = result.roles
    assert torch.all(g.token_weights[roles == ANSWER] == 1)
    assert torch.all(g.token_weights[roles == PROMPT] == 0)
    assert torch.allclose(g.token_weights[roles == VISION], torch.tensor(rho["self_attn.o_proj"][0]))


def test_qig_weights_are_per_sample_distributions(calib):
    result = qig.quantize(tiny_llava(outliers=True), QIGConfig(**SETTING), calib, progress=False)
    for g in result.groups:
        w = g.token_weights
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5)
        assert torch.all(w[result.roles == 0] == 0)
    assert result.groups[0].notes["baseline"] == "zero"  # layer 0, first group: x^q == x
    assert result.groups[1].notes["baseline"] == "quantized"


def test_compat_preset_uses_uniform_weights_first(calib):
    result = qig.quantize(tiny_llava(outliers=True), QIGConfig.compat(**SETTING, steps=4), calib, progress=False)
    first, sixth = result.groups[0], result.groups[5]
    assert "uniform" in first.notes["baseline"]
    assert torch.all(first.token_weights[result.roles == PROMPT] == 0)
    assert sixth.notes["baseline"] == "zero"


def test_qig_vision_answer_tokens_only(calib):
    result = qig.quantize(
        tiny_llava(outliers=True), QIGConfig(**SETTING, tokens="vision+answer"), calib, progress=False
    )
    for g in result.groups:
        w = g.token_weights
        assert torch.all(w[result.roles == PROMPT] == 0)
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-5)
        assert w[result.roles == VISION].sum() > 0 and w[result.roles == ANSWER].sum() > 0
