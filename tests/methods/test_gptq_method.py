"""GPTQ through the pipeline: plain, with token-weighted Hessians, after a scale search; configs and refusals."""

import pytest
import torch
from _tiny import tiny_llava

import qig
from qig.errors import QigError
from qig.methods import AWQConfig, GPTQConfig, QIGConfig, RTNConfig, make_config
from qig.models import family_for
from qig.pipeline import capture
from qig.pipeline.gptq import hessian_source, sequential_stages
from qig.quant.gptq import GPTQSettings
from qig.quant.spec import dequantize, quantize_with
from qig.runs import config_from_dict

SETTING = dict(wbits=3, group_size=32)


def _run(config, calib, **model_kw):
    model = tiny_llava(outliers=True, **model_kw)
    return model, qig.quantize(model, config, calib, progress=False)


def test_gptq_beats_rtn_and_improves_a_search(calib, logit_error):
    err = {}
    for label, config in {
        "rtn": RTNConfig(**SETTING),
        "gptq": GPTQConfig(**SETTING),
        "awq": AWQConfig(**SETTING, n_grid=5),
        "awq+gptq": AWQConfig(**SETTING, n_grid=5, quantizer="gptq"),
    }.items():
        err[label] = logit_error(_run(config, calib)[0])
    assert err["gptq"] < err["rtn"]
    assert err["awq+gptq"] < err["awq"]


def test_uniform_token_weights_give_exactly_plain_gptq(calib):
    plain, _ = _run(GPTQConfig(**SETTING), calib)
    weighted, result = _run(GPTQConfig.weighted_by("awq", **SETTING), calib)  # AWQ weighs every real token 1
    assert all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(), weighted.state_dict().values(), strict=True)
    )
    assert result.groups and all(g.scales is None for g in result.groups)  # token weights only, no search


@pytest.mark.parametrize("act_order", [False, True], ids=["natural-order", "act-order"])
def test_qig_weighted_gptq_is_on_the_grid_and_differs_from_plain(calib, act_order):
    gptq = GPTQSettings(act_order=act_order)
    plain, _ = _run(GPTQConfig(**SETTING, gptq=gptq), calib)
    model, result = _run(GPTQConfig.weighted_by("qig", **SETTING, gptq=gptq), calib)
    layers = family_for(model).decoder_layers(model)
    assert len(result.quantized) == 7 * len(layers)
    spec = result.config.spec
    for key, params in result.quantized.items():
        li, name = key.split(".", 1)
        w = layers[int(li)].get_submodule(name).weight.data
        assert ("g_idx" in params) == act_order
        if act_order:
            w = w[:, torch.argsort(params["g_idx"], stable=True)]
        scale, zero = params["scale"], params["zero"]
        assert torch.equal(dequantize(quantize_with(w, scale, zero, spec), scale, zero, spec), w)
    assert not torch.equal(
        model.model.language_model.layers[1].mlp.down_proj.weight,
        plain.model.language_model.layers[1].mlp.down_proj.weight,
    )
    assert result.method_summary["gptq"]["act_order"] == act_order
    assert len(result.method_summary["gptq"]["seconds_per_layer"]) == len(layers)


def test_hessians_come_in_call_order_stages(calib):
    model = tiny_llava(kv_heads=2)  # GQA: no v -> o group
    fam = family_for(model)
    chunk = capture(model, fam, calib, 8, torch.device("cpu"))[0]
    layer = fam.decoder_layers(model)[0]
    stages = sequential_stages(layer, chunk, 0)
    assert stages == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    groups = fam.active_groups(layer)
    assert hessian_source("self_attn.o_proj", groups) == "attn_in"  # the attention block's weights
    assert hessian_source("mlp.down_proj", groups) == "mlp_out"


def test_saved_result_holds_gptq_params_and_config_round_trips(calib, tmp_path):
    config = GPTQConfig.weighted_by("qig", **SETTING, steps=4, gptq=GPTQSettings(damp=0.05, act_order=True))
    _, result = _run(config, calib)
    result.save(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "search.safetensors")
    assert "quantized.0.self_attn.q_proj.scale" in tensors and "quantized.1.mlp.down_proj.g_idx" in tensors
    assert config_from_dict(config.to_dict()) == config
    awq_gptq = AWQConfig(**SETTING, quantizer="gptq", gptq=GPTQSettings(block_size=64))
    assert config_from_dict(awq_gptq.to_dict()) == awq_gptq
    with pytest.raises(QigError, match="needs calibration data"):
        qig.quantize(tiny_llava(), awq_gptq, scales={(0, "attn_in"): torch.ones(128)}, progress=False)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AWQConfig(quantizer="gptqq"), "quantizer 'gptqq' is not supported; use one of: rtn, gptq"),
        (lambda: AWQConfig(gptq=GPTQSettings(damp=0.1)), "quantizer is 'rtn'; pass quantizer='gptq'"),
        (lambda: GPTQConfig(wbits=3, token_weights=QIGConfig(wbits=4)), "give both the same wbits and group_size"),
        (lambda: GPTQConfig(token_weights=RTNConfig()), "the config of one of awq, mbq, qig; None: the plain Hessian"),
        (lambda: GPTQConfig(token_weights=AWQConfig(quantizer="gptq")), "its quantizer must stay 'rtn'"),
        (lambda: GPTQConfig(group_size=64, gptq=GPTQSettings(block_size=96)), "must divide one another"),
        (lambda: GPTQConfig.weighted_by("rtn"), "use one of: awq, mbq, qig"),
        (lambda: make_config("gptq", gptq={"dampening": 0.1}), "gptq has no option(s) dampening"),
    ],
    ids=[
        "quantizer",
        "settings-without-gptq",
        "spec-mismatch",
        "not-a-weighting",
        "nested-gptq",
        "block",
        "weighted-by",
        "unknown-option",
    ],
)
def test_invalid_combinations_are_refused(make, message):
    with pytest.raises(QigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_gptq_block_size_is_checked_only_where_gptq_runs():
    # A group size GPTQ's default block cannot pair with is still fine for an RTN-quantized search...
    assert QIGConfig(wbits=3, group_size=96).gptq_settings is None
    # ...and refused as soon as GPTQ would run with it.
    with pytest.raises(QigError, match="must divide one another"):
        QIGConfig(wbits=3, group_size=96, quantizer="gptq")
