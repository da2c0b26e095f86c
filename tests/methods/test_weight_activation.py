"""Weight-activation modes: configs and refusals, SmoothQuant's formula, the methods on a toy with outliers."""

import pytest
import torch
from _tiny import tiny_llava

import qig
from qig.errors import QigError
from qig.methods import (
    AWQConfig,
    GPTQConfig,
    MBQConfig,
    QIGConfig,
    RTNConfig,
    SmoothQuantConfig,
    make_config,
)
from qig.methods.smoothquant import smoothing_scales
from qig.quant.activation import activation_quantization

W4A8 = dict(wbits=4, abits=8, group_size=None)


def test_every_scaling_method_beats_rtn_at_w4a8(quantized_error):
    configs = [
        RTNConfig(**W4A8),
        SmoothQuantConfig(**W4A8),
        MBQConfig(**W4A8, grad_batch_size=8, n_grid=10),
        QIGConfig(**W4A8, n_grid=10),
    ]
    errors = {c.name: quantized_error(c) for c in configs}
    for name in ("smoothquant", "mbq", "qig"):
        assert errors[name] < errors["rtn"], errors


def test_wa_model_quantizes_activations_and_records_it(calib):
    model = tiny_llava(outliers=True)
    result = qig.quantize(model, QIGConfig(**W4A8, n_grid=4), calib, progress=False)
    spec, n = activation_quantization(model)
    assert (spec.bits, spec.dynamic, n) == (8, True, 2 * 7)
    entry = model.config.qig_quantization
    assert entry["abits"] == 8 and entry["wbits"] == 4 and entry["group_size"] is None
    assert entry["activations"] == "per-token symmetric dynamic" and entry["weight_symmetric"] is True
    # W-A weights: per output channel, symmetric: at most 2^4 - 1 distinct values per row, sign-symmetric grid
    w = model.model.language_model.layers[1].mlp.down_proj.weight
    step = w.abs().amax(1, keepdim=True) / 7
    assert torch.allclose(w / step, (w / step).round(), atol=1e-3)
    # QIG's reference input is x^q where the streams differ
    assert result.groups[0].notes["baseline"] == "zero" and result.groups[1].notes["baseline"] == "quantized"
    with pytest.raises(QigError, match="already quantizes its activations"):
        qig.quantize(model, RTNConfig(**W4A8), progress=False)


def test_smoothquant_scales_follow_the_formula(calib):
    model = tiny_llava(outliers=True)
    layer = model.model.language_model.layers[0]
    seen = []
    layer.input_layernorm.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        for batch in calib.batches(16):
            model(**batch.inputs)
    roles = torch.cat([b.roles for b in calib.batches(16)])
    x = torch.cat(seen)[roles != 0]  # [tokens, C]: layer 0's first group sees the FP input on both streams
    linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
    w_max = torch.cat([m.weight.detach().abs() for m in linears]).amax(0)
    expected = x.abs().amax(0).pow(0.3) / w_max.pow(0.7)

    result = qig.quantize(model, SmoothQuantConfig(**W4A8, alpha=0.3), calib, progress=False)
    s = result.scales()[(0, "attn_in")]
    assert torch.allclose(s, expected, rtol=1e-4)
    assert result.groups[0].ratio == 0.3 and result.groups[0].loss_after < result.groups[0].loss_before


def test_smoothing_scales_balance_the_channel_maxima():
    x_max = torch.tensor([100.0, 1.0, 4.0])
    w = torch.tensor([[1.0, 4.0, 1.0], [-0.5, 1.0, 0.25]])
    s = smoothing_scales(x_max, [w], alpha=0.5)
    # after smoothing, activation max and weight max of every channel are equal: max|X|/s == max|W|*s
    assert torch.allclose(x_max / s, w.abs().amax(0) * s)


def test_compat_preset_takes_the_official_w4a8_choices():
    wa = QIGConfig.compat(**W4A8)
    assert (wa.baseline, wa.clip, wa.reference_output, wa.steps) == ("quantized-always", "none", "quantized", 32)
    weight_only = QIGConfig.compat(wbits=3)
    assert (weight_only.baseline, weight_only.clip, weight_only.reference_output) == ("zero", "iqr", "fp")
    assert make_config("qig", preset="compat", **W4A8) == wa


def test_reference_output_changes_what_the_search_scores_against(calib):
    results = [
        qig.quantize(tiny_llava(outliers=True), AWQConfig(**W4A8, n_grid=4, reference_output=r), calib, progress=False)
        for r in ("fp", "quantized")
    ]
    fp_ref, q_ref = ([g.loss_before for g in r.groups] for r in results)
    assert fp_ref[0] == pytest.approx(q_ref[0])  # layer 0, first group: x^q == x
    assert fp_ref[-1] != pytest.approx(q_ref[-1])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RTNConfig(wbits=4, abits=3, group_size=None), "abits 3 is not supported; use an integer from 4 to 16"),
        (lambda: RTNConfig(wbits=4, abits=8), "group_size 128 is not allowed; pass group_size=None"),
        (lambda: QIGConfig(wbits=4, abits=8, group_size=64), "group_size 64 is not allowed"),
        (lambda: RTNConfig(wbits=9, abits=8, group_size=None), "weight bits 9"),
        (lambda: GPTQConfig(wbits=4, abits=8, group_size=None), "GPTQ is weight-only here"),
        (lambda: AWQConfig(**W4A8, quantizer="gptq"), "quantizer 'gptq' is weight-only"),
        (lambda: SmoothQuantConfig(wbits=4), "give it abits below 16"),
        (lambda: SmoothQuantConfig(**W4A8, alpha=1.5), r"alpha 1.5 is not supported; use a number in \[0.0, 1.0\]"),
        (lambda: MBQConfig(wbits=3, reference_output="quantized"), "applies to weight-activation modes"),
    ],
    ids=[
        "abits-3",
        "group-default",
        "group-64",
        "wbits-9",
        "gptq",
        "search-then-gptq",
        "smoothquant-a16",
        "alpha",
        "reference-a16",
    ],
)
def test_invalid_combinations_are_refused(build, message):
    with pytest.raises(QigError, match=message):
        build()
