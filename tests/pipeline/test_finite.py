"""Non-finite values are refused where they enter: the decoder weights, saved scales, the hidden states."""

import math

import pytest
import torch
from _tiny import calibration, tiny_llava

import qig
from qig.errors import QigError
from qig.methods import AWQConfig, GPTQConfig, RTNConfig
from qig.models import family_for
from qig.pipeline import collect_token_weights
from qig.pipeline.finite import check_hidden, is_finite

CONFIGS = {"rtn": RTNConfig(wbits=3, group_size=32), "awq": AWQConfig(wbits=3, group_size=32, n_grid=3)}


def _decoder_weights(model) -> dict[str, torch.Tensor]:
    return {path: lin.weight.clone() for path, lin in family_for(model).decoder_linears(model).items()}


@pytest.fixture(scope="module")
def calib():
    return calibration(4)


@pytest.mark.parametrize(
    ("method", "path", "value"),
    [
        ("rtn", "layers.1.mlp.down_proj.weight", math.nan),
        ("awq", "layers.1.self_attn.q_proj.bias", math.inf),
        ("rtn", "layers.0.self_attn.k_proj.weight", -math.inf),
    ],
    ids=["nan-weight-rtn", "inf-bias-awq", "minus-inf-weight-rtn"],
)
def test_a_non_finite_decoder_weight_is_refused_before_any_work(calib, method, path, value):
    model = tiny_llava(outliers=True)
    with torch.no_grad():
        model.model.language_model.get_parameter(path).view(-1)[5] = value
    before = _decoder_weights(model)
    full = f"model.language_model.{path}"
    with pytest.raises(QigError, match=rf"^the model's {full} holds NaN or inf values; the checkpoint is corrupt"):
        qig.quantize(model, CONFIGS[method], calib, progress=False)
    after = _decoder_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before if not full.startswith(k + "."))  # nothing quantized
    assert not hasattr(model.config, "qig_quantization")


def test_inspecting_token_weights_refuses_a_corrupt_model_too(calib):
    model = tiny_llava()
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.up_proj.weight[0, 0] = math.nan
    with pytest.raises(QigError, match="layers.0.mlp.up_proj.weight holds NaN or inf"):
        collect_token_weights(model, [qig.QIGConfig(wbits=3, group_size=32)], calib, [0], progress=False)


def _nan_output(module, args, out):
    return out * math.nan


def _embeddings_nan(model):
    model.model.language_model.embed_tokens.register_forward_hook(_nan_output)


def _layer0_nan(model):
    model.model.language_model.layers[0].register_forward_hook(_nan_output)


@torch.no_grad()
def _v_bias_overflows(model):  # finite, but the attention output overflows float32 in layer 1
    model.model.language_model.layers[1].self_attn.v_proj.bias.fill_(3e38)


@pytest.mark.parametrize(
    ("corrupt", "config", "message"),
    [
        (_embeddings_nan, CONFIGS["awq"], "the input of decoder layer 0 holds NaN or inf in calibration batch 0"),
        (_layer0_nan, CONFIGS["awq"], "layer 0's output on the FP stream x holds NaN or inf"),
        (_layer0_nan, GPTQConfig(wbits=3, group_size=32), "layer 0's output on the quantized stream x\\^q holds NaN"),
        (_v_bias_overflows, CONFIGS["awq"], "layer 1's output on the FP stream x holds NaN or inf"),
    ],
    ids=["embeddings-awq", "layer0-fp-stream-awq", "layer0-quantized-stream-gptq", "overflowing-bias-awq"],
)
def test_hidden_states_that_become_non_finite_are_refused_naming_layer_and_stream(calib, corrupt, config, message):
    model = tiny_llava(outliers=True)
    corrupt(model)
    with pytest.raises(QigError, match=message):
        qig.quantize(model, config, calib, progress=False)
    assert not hasattr(model.config, "qig_quantization")


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        (torch.ones(64), "saved scales for layer 1 mlp_in have 64 channels, but the group's linears take 128 inputs"),
        (torch.ones(128).index_fill(0, torch.tensor([3]), math.nan), "layer 1 mlp_in: 1 of its 128 scales are NaN"),
        (torch.zeros(128), "layer 1 mlp_in: 128 of its 128 scales are zero or negative"),
        (torch.ones(2, 64), r"scales.1.mlp_in must be a 1-D tensor, one scale per channel; got shape \[2, 64\]"),
    ],
    ids=["wrong-length", "nan", "zero", "two-dims"],
)
def test_saved_scales_that_do_not_fit_are_refused_before_the_first_layer(scale, message):
    model = tiny_llava()
    before = _decoder_weights(model)
    scales = {(0, "attn_in"): torch.ones(128), (1, "mlp_in"): scale}
    with pytest.raises(QigError, match=message):
        qig.quantize(model, RTNConfig(wbits=3, group_size=32), scales=scales, progress=False)
    after = _decoder_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # layer 0 neither scaled nor quantized


def test_the_checks_only_read():
    h = torch.randn(2, 3, 4)
    check_hidden(h, "layer 0's output", 0, "no fix needed")
    assert is_finite(h) and is_finite(torch.tensor([1, 2])) and not is_finite(torch.tensor([1.0, math.inf]))
    with pytest.raises(QigError, match="^layer 2's output holds NaN or inf in calibration batch 1; the fix$"):
        check_hidden(torch.full((1, 2, 2), math.nan), "layer 2's output", 1, "the fix")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "minus-inf"])
def test_the_first_non_finite_tensor_is_named(bad):
    from qig.pipeline.finite import first_non_finite

    ok = torch.randn(8, 8)
    broken = torch.randn(4, 4, dtype=torch.bfloat16)
    broken[2, 3] = bad
    named = [("ints", torch.arange(3)), ("empty", torch.empty(0)), ("meta", torch.empty(2, device="meta"))]
    assert first_non_finite([*named, ("ok", ok)]) is None
    assert first_non_finite([("ok", ok), ("broken", broken), ("also", broken.clone())]) == "broken"
    assert not is_finite(broken) and is_finite(ok)


def test_a_float16_tensor_whose_sum_overflows_is_finite():
    from qig.pipeline.finite import first_non_finite

    big = torch.full((4, 1000), 60000.0, dtype=torch.float16)  # every entry finite, the sum far past 65504
    assert not torch.isfinite(big.sum()) and is_finite(big) and first_non_finite([("big", big)]) is None
