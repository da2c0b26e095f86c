"""GPTQ of one linear: beats RTN on correlated inputs, weighted Hessians, dead channels, exact grid."""

import pytest
import torch

from qig.errors import QigError
from qig.quant.gptq import GPTQSettings, Hessian, gptq_quantize, normalize_token_weights
from qig.quant.spec import QuantSpec, dequantize, fake_quantize, quantize_with

SPEC = QuantSpec(bits=3, group_size=32)


def group_order(r) -> torch.Tensor | None:
    """A column permutation [C] that makes every group of the GPTQ result ``r`` contiguous (None if they are)."""
    return None if r.g_idx is None else torch.argsort(r.g_idx, stable=True)


def correlated_inputs(n: int, C: int = 128, seed: int = 0) -> torch.Tensor:
    """Tokens [n, C] whose channels are strongly correlated (a random mixing of few factors) plus noise."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, 16, generator=g)
    mixing = torch.randn(16, C, generator=g)
    scale = torch.exp(torch.randn(C, generator=g))  # uneven channel magnitudes
    return (factors @ mixing + 0.1 * torch.randn(n, C, generator=g)) * scale


def weight(out: int = 32, C: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, C, generator=torch.Generator().manual_seed(seed))


def out_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """||W X - W_hat X|| over the tokens X [n, C]."""
    return float(((W - W_hat) @ X.T).norm())


def hessian(X: torch.Tensor, w: torch.Tensor | None = None) -> Hessian:
    h = Hessian(X.shape[1])
    h.add(X, w)
    return h


@pytest.mark.parametrize("act_order", [False, True], ids=["natural-order", "act-order"])
@pytest.mark.parametrize("spec", [SPEC, QuantSpec(bits=4, group_size=None)], ids=["w3g32", "w4-channel"])
def test_gptq_output_error_is_below_rtn(spec, act_order):
    X, W = correlated_inputs(1024), weight()
    result = gptq_quantize(W, hessian(X), spec, GPTQSettings(block_size=64, act_order=act_order))
    assert out_error(W, result.weight, X) < 0.8 * out_error(W, fake_quantize(W, spec), X)


@pytest.mark.parametrize(
    ("spec", "act_order"),
    [(SPEC, False), (SPEC, True), (QuantSpec(bits=2, group_size=64), True), (QuantSpec(bits=4, group_size=None), True)],
    ids=["w3g32", "w3g32-act-order", "w2g64-act-order", "w4-channel-act-order"],
)
def test_output_is_exactly_on_the_quantizers_grid(spec, act_order):
    X, W = correlated_inputs(512), weight()
    r = gptq_quantize(W, hessian(X), spec, GPTQSettings(block_size=32, act_order=act_order))
    assert (r.g_idx is not None) == (act_order and spec.group_size is not None)
    order = group_order(r)
    W_hat = r.weight if order is None else r.weight[:, order]  # groups contiguous
    q = quantize_with(W_hat, r.scale, r.zero, spec)
    assert torch.equal(dequantize(q, r.scale, r.zero, spec), W_hat)
    if r.g_idx is not None:
        assert torch.equal(torch.bincount(r.g_idx.long()), torch.full((128 // spec.group_size,), spec.group_size))


@pytest.mark.parametrize("act_order", [False, True], ids=["natural-order", "act-order"])
def test_lazy_block_updates_do_not_change_the_result(act_order):
    # Block size only batches the updates (the paper's "lazy batch"); the math is the same.
    X, W = correlated_inputs(512), weight()
    spec = QuantSpec(bits=3, group_size=64)
    results = [
        gptq_quantize(W, hessian(X), spec, GPTQSettings(block_size=b, act_order=act_order)) for b in (16, 64, 128)
    ]
    for r in results[1:]:
        flips = (r.weight - results[0].weight).abs() > 1e-4  # a different code, not float noise in the scale
        assert float(flips.float().mean()) < 0.01
        assert abs(r.error - results[0].error) < 0.02 * results[0].error


def test_plain_block_order_groups_need_no_index():
    r = gptq_quantize(weight(), hessian(correlated_inputs(256)), SPEC)
    assert r.g_idx is None and group_order(r) is None and r.scale.shape == (32, 4)


@pytest.mark.parametrize("value", [1.0, 0.25, 1 / 7], ids=["one", "quarter", "seventh"])
def test_equal_token_weights_give_exactly_plain_gptq(value):
    X, W = correlated_inputs(512), weight()
    (w,) = normalize_token_weights([torch.full((512,), value)])
    weighted = gptq_quantize(W, hessian(X, w), SPEC)
    plain = gptq_quantize(W, hessian(X), SPEC)
    assert torch.equal(weighted.weight, plain.weight)


def test_weights_concentrated_on_tokens_lower_their_error():
    X = torch.cat([correlated_inputs(768, seed=0), correlated_inputs(256, seed=5)])  # two token populations
    W = weight()
    w = torch.full((1024,), 1e-3)
    w[768:] = 1.0  # the tokens that matter
    weighted = gptq_quantize(W, hessian(X, w), SPEC)
    plain = gptq_quantize(W, hessian(X), SPEC)
    focus = X[768:]
    assert out_error(W, weighted.weight, focus) < 0.9 * out_error(W, plain.weight, focus)


def test_hessian_is_a_running_mean_over_real_tokens_only():
    X = correlated_inputs(300)
    real = torch.ones(300, dtype=torch.bool)
    real[::7] = False  # pad tokens
    h = Hessian(128)
    for part, r in zip(X.split(64), real.split(64), strict=True):
        h.add(part, r.float())
    Xr = X[real]
    expected = 2 * Xr.T.double() @ Xr.double() / Xr.shape[0]
    assert torch.allclose(h.finish().double(), expected, rtol=1e-4, atol=1e-3 * float(expected.abs().max()))
    assert h.H.dtype == torch.float32 and h.weight_sum == Xr.shape[0] and h.tokens == Xr.shape[0]


def test_dead_input_channels_are_handled():
    X, W = correlated_inputs(256), weight()
    X[:, [3, 40, 41]] = 0.0  # channels never active: H has zero rows and columns
    r = gptq_quantize(W, hessian(X), SPEC, GPTQSettings(act_order=True))
    assert r.dead == 3 and torch.isfinite(r.weight).all()
    assert torch.all(r.weight[:, [3, 40, 41]] == 0)  # zeroed, as the reference GPTQ does
    assert out_error(W, r.weight, X) < out_error(W, fake_quantize(W, SPEC), X)


def test_a_channel_dead_only_on_weighted_tokens_is_kept():
    X, W = correlated_inputs(256), weight()
    w = torch.zeros(256)
    w[:128] = 1.0
    X[:128, 5] = 0.0  # channel 5 lives only on tokens that weigh 0
    h = Hessian(128)
    h.add(X, w, real=torch.ones(256, dtype=torch.bool))  # every token is real; half of them weigh 0
    r = gptq_quantize(W, h, SPEC)
    assert r.dead == 1
    assert r.weight[:, 5].abs().sum() > 0  # not zeroed: the unweighted tokens still use it
    unseen = hessian(X[:128])  # the same tokens as the only real ones: dead everywhere, zeroed
    assert torch.all(gptq_quantize(W, unseen, SPEC).weight[:, 5] == 0)


def test_all_zero_inputs_do_not_crash():
    r = gptq_quantize(weight(), hessian(torch.zeros(64, 128)), SPEC)
    assert torch.all(r.weight == 0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GPTQSettings(damp=0), "damp must be a number in (0, 1)"),
        (lambda: GPTQSettings(block_size=0), "block_size must be a positive integer"),
        (lambda: GPTQSettings(block_size=48).check(SPEC), "must divide one another"),
        (lambda: Hessian(8).finish(), "no token with a positive weight"),
        (lambda: normalize_token_weights([torch.zeros(4)]), "every token weight is zero"),
        (lambda: hessian(torch.ones(4, 8), -torch.ones(4)), "finite and >= 0"),
    ],
    ids=["damp", "block-size", "block-vs-group", "empty-hessian", "zero-weights", "negative-weights"],
)
def test_refusals_say_what_is_allowed(make, message):
    with pytest.raises(QigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()
