"""The weight-activation fake-quant linear: integer-domain equivalence, A16 = weight-only, per-token scales."""

import pytest
import torch

from qig.errors import QigError
from qig.quant.activation import (
    activation_spec_of,
    fake_quantize_activations,
    install_activation_quantizer_,
    quantized_activations,
    remove_activation_quantizer_,
)
from qig.quant.rtn import rtn_
from qig.quant.spec import QuantSpec, activation_spec, fake_quantize, quant_params, quantize


def wa_linear(x, weight, bias, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> torch.Tensor:
    """The W-A fake-quant linear as a function: ``linear(Q_a(x), Q_w(W), b)``; ``act_spec`` None keeps x.

    x: [..., in]; weight: [out, in] -> [..., out].
    """
    xq = x if act_spec is None else fake_quantize_activations(x, act_spec)
    return torch.nn.functional.linear(xq, fake_quantize(weight, weight_spec), bias)


@torch.no_grad()
def quantize_linear_(linear: torch.nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> None:
    """Make ``linear`` a W-A fake-quant linear in place: weight fake-quantized, input quantizer installed."""
    weight_spec.check(linear.in_features)
    linear.weight.copy_(fake_quantize(linear.weight.data, weight_spec))
    if act_spec is not None:
        install_activation_quantizer_(linear, act_spec)


def _linear(in_features=96, out_features=24, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features)
    return lin


def _inputs(seed=1, shape=(3, 7, 96)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., :4] *= 20  # outlier channels
    x[0, 2] *= 50  # one loud token
    return x


@pytest.mark.parametrize(("wbits", "abits"), [(4, 8), (8, 8), (4, 4), (2, 6), (8, 16)], ids=lambda v: str(v))
@torch.no_grad()
def test_fake_quant_linear_matches_integer_matmul(wbits, abits):
    lin = _linear()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    x = _inputs()
    wspec, aspec = QuantSpec(bits=wbits, group_size=None, symmetric=True), activation_spec(abits)
    quantize_linear_(lin, wspec, aspec)
    y = lin(x)  # [3, 7, 24]

    # explicit: integer codes, an integer-domain matmul, one rescale by s_x (per token) * s_w (per channel)
    qw, sw, zw = quantize(w, wspec)  # [24, 96] int8, [24, 1]
    rows = x.reshape(-1, 96)
    qx, sx, zx = quantize(rows, aspec)  # [21, 96] int8 (int16 above 8 bits), [21, 1]
    assert torch.all(zw == 0) and torch.all(zx == 0)
    acc = qx.long() @ qw.long().T  # [21, 24], exact
    expected = (acc.double() * sx.double() * sw.double().T + b.double()).reshape(3, 7, 24)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert torch.allclose(wa_linear(x, w, b, wspec, aspec), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@torch.no_grad()
def test_activations_at_16_bits_reproduce_the_weight_only_per_channel_result(symmetric):
    wspec = QuantSpec(bits=4, group_size=None, symmetric=symmetric)
    wa, weight_only = _linear(), _linear()
    quantize_linear_(wa, wspec, None)  # A16: no activation quantizer
    rtn_({"lin": weight_only}, wspec)
    x = _inputs()
    assert activation_spec_of(wa) is None
    assert torch.equal(wa.weight, weight_only.weight)
    assert torch.equal(wa(x), weight_only(x))
    assert torch.equal(wa_linear(x, _linear().weight, _linear().bias, wspec, None), weight_only(x))


def test_activation_scales_are_per_token_and_dynamic():
    x = _inputs()
    spec = activation_spec(8)
    xq = fake_quantize_activations(x, spec)
    louder = x.clone()
    louder[1, 3] *= 1000  # one token changes; every other token's quantization must not
    xq2 = fake_quantize_activations(louder, spec)
    others = torch.ones(3, 7, dtype=torch.bool)
    others[1, 3] = False
    assert torch.equal(xq[others], xq2[others])
    # the grid step of each token is its own abs-max / 127
    scale, _ = quant_params(x.reshape(-1, 96), spec)
    assert torch.allclose(scale.view(3, 7), x.abs().amax(-1) / 127)
    assert (xq - x).abs().le(scale.view(3, 7, 1) / 2 + 1e-6).all()


def test_straight_through_gradient():
    x = _inputs().requires_grad_(True)
    y = fake_quantize_activations(x, activation_spec(4))
    assert torch.equal(y.detach(), fake_quantize_activations(x.detach(), activation_spec(4)))
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


def test_quantizers_install_once_and_come_off():
    lin = _linear()
    quantize_linear_(lin, QuantSpec(bits=4, group_size=None, symmetric=True), activation_spec(8))
    quantize_linear_(lin, QuantSpec(bits=8, group_size=None, symmetric=True), activation_spec(6))
    assert len(lin._forward_pre_hooks) == 1 and activation_spec_of(lin).bits == 6
    assert remove_activation_quantizer_(lin) and activation_spec_of(lin) is None
    other = _linear()
    with quantized_activations([other], activation_spec(8)):
        assert activation_spec_of(other).bits == 8
    assert activation_spec_of(other) is None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: activation_spec(3), "activation bits 3 not supported; use an integer from 4 to 16"),
        (lambda: activation_spec(17), "activation bits 17"),
        (lambda: QuantSpec(bits=8, group_size=64, symmetric=True, dynamic=True), "per token, symmetric"),
        (lambda: QuantSpec(bits=16, group_size=None), "weight bits 16 not supported"),
        (lambda: fake_quantize_activations(torch.ones(2, 4), QuantSpec(bits=4)), "is a weight quantizer"),
    ],
    ids=["abits-3", "abits-17", "grouped-activations", "weight-16", "weight-spec-on-activations"],
)
def test_invalid_specs_are_refused(build, message):
    with pytest.raises(QigError, match=message):
        build()
