"""QIG attribution: completeness, concentration on planted error, quadrature agreement, clipping."""

import pytest
import torch

from qig.methods import QIGConfig
from qig.methods.qig import integrated_gradients, iqr_clip, lambdas, quadrature, quantization_error
from qig.quant.spec import QuantSpec, fake_quantize

SPEC = QuantSpec(bits=3, group_size=32)


class ToyMLP(torch.nn.Module):
    """gate/up/down like a Qwen2 MLP: token-wise, nonlinear."""

    def __init__(self, c: int = 64, h: int = 128, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.gate, self.up, self.down = torch.nn.Linear(c, h), torch.nn.Linear(c, h), torch.nn.Linear(h, c)

    def forward(self, x, weights=None):
        w = weights or {}
        g = torch.nn.functional.linear(x, w.get("gate", self.gate.weight), self.gate.bias)
        u = torch.nn.functional.linear(x, w.get("up", self.up.weight), self.up.bias)
        return torch.nn.functional.linear(torch.nn.functional.silu(g) * u, w.get("down", self.down.weight))


def _pair(block):
    q = {n: fake_quantize(getattr(block, n).weight.detach(), SPEC) for n in ("gate", "up", "down")}
    return (lambda z: block(z)), (lambda z: block(z, q))


def _inputs(b=2, t=16, c=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, c, generator=g)
    x[:, :, :3] *= 8  # outlier channels
    x_ref = x + 0.3 * torch.randn(b, t, c, generator=g)  # a "quantized stream" nearby
    real = torch.ones(b, t, dtype=torch.bool)
    real[1, -4:] = False  # padding
    return x, x_ref, real


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.mark.parametrize("baseline", ["quantized", "zero"])
def test_completeness(baseline):
    block = ToyMLP().requires_grad_(False)
    f, f_q = _pair(block)
    x, x_ref, real = _inputs()
    if baseline == "zero":
        x_ref = torch.zeros_like(x)
    nodes, w = quadrature("gauss-legendre", 64)
    ig = integrated_gradients(f, f_q, x, x_ref, real, nodes, w)
    F = lambda z: float(quantization_error(f(z)[None], f_q(z)[None], real)[0])  # noqa: E731
    expected = F(x) - F(x_ref)
    assert float(ig.sum()) == pytest.approx(expected, rel=2e-2, abs=1e-3 * abs(F(x)))


def test_weights_concentrate_on_planted_tokens():
    # Only columns 0..7 of W lose precision; only the planted tokens use those channels.
    c, h = 64, 64
    lin = torch.nn.Linear(c, h, bias=False).requires_grad_(False)
    torch.manual_seed(0)
    lin.weight.copy_(torch.randint(0, 8, (h, c)).float() / 7)  # exactly on the 3-bit grid of [0, 1]
    lin.weight[:, [0, 32]] = 0.0  # every group spans [0, 1]: scale 1/7, zero 0
    lin.weight[:, [1, 33]] = 1.0
    lin.weight[:, 2:8] = 0.1 + 0.8 * torch.rand(h, 6)  # off-grid columns
    q = fake_quantize(lin.weight, QuantSpec(bits=3, group_size=32))
    f = lambda z: torch.nn.functional.linear(z, lin.weight)  # noqa: E731
    f_q = lambda z: torch.nn.functional.linear(z, q)  # noqa: E731
    x = torch.randn(1, 20, c)
    x[..., 2:8] = 0
    planted = torch.tensor([1, 3, 4, 8, 9, 12, 15, 16, 18, 19])
    x[0, planted, 2:8] = 3 * torch.randn(len(planted), 6)
    real = torch.ones(1, 20, dtype=torch.bool)
    nodes, w = quadrature("gauss-legendre", 4)
    ig = integrated_gradients(f, f_q, x, torch.zeros_like(x), real, nodes, w)
    lam, dead = lambdas(ig, real, "iqr")
    assert dead == 0
    assert float(lam[0, planted].sum()) > 0.95
    assert float(lam.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("baseline", ["quantized", "zero"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauss_legendre_ranks_tokens_like_32_step_riemann(seed, baseline):
    block = ToyMLP(seed=seed).requires_grad_(False)
    f, f_q = _pair(block)
    x, x_ref, real = _inputs(b=4, t=48, seed=seed + 10)
    if baseline == "zero":
        x_ref = torch.zeros_like(x)
    scores = {}
    for kind, k in (("riemann", 32), ("gauss-legendre", QIGConfig().steps)):
        ig = integrated_gradients(f, f_q, x, x_ref, real, *quadrature(kind, k))
        scores[kind] = ig.abs().mean(-1)[real]  # q_t over real tokens
    assert _spearman(scores["riemann"], scores["gauss-legendre"]) >= 0.99


def test_iqr_clip_caps_outliers_and_zeroes_pad():
    q = torch.tensor([[0.1, 0.1, 0.12, 0.11, 0.09, 5.0, 0.3]])
    real = torch.tensor([[True, True, True, True, True, True, False]])
    out = iqr_clip(q, real)
    assert out[0, 5] < 0.2 and out[0, 6] == 0
    assert torch.equal(out[0, :5], q[0, :5])


def test_zero_attribution_falls_back_to_uniform():
    ig = torch.zeros(1, 5, 4)
    real = torch.tensor([[True, True, True, False, False]])
    lam, dead = lambdas(ig, real, "iqr")
    assert dead == 1
    assert torch.allclose(lam, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0, 0]]))


@pytest.mark.parametrize("kind", ["gauss-legendre", "riemann"])
def test_quadrature_weights_sum_to_one(kind):
    nodes, w = quadrature(kind, 8)
    assert float(w.sum()) == pytest.approx(1.0)
    assert 0 <= float(nodes.min()) and float(nodes.max()) <= 1


def test_path_points_in_several_passes_give_the_same_attribution():
    block = ToyMLP(seed=3).requires_grad_(False)
    f, f_q = _pair(block)
    x, x_ref, real = _inputs(b=2, t=16, seed=5)
    nodes, weights = quadrature("riemann", 6)
    whole = integrated_gradients(f, f_q, x, x_ref, real, nodes, weights)
    for per_pass in (1, 4):
        split = integrated_gradients(f, f_q, x, x_ref, real, nodes, weights, per_pass)
        assert torch.allclose(split, whole, rtol=1e-5, atol=1e-7)


def test_the_search_chooses_the_same_scales_whatever_the_path_passes(monkeypatch):
    """The speed setting (path points per pass) leaves the chosen scales as they are."""
    from _tiny import calibration, tiny_llava

    import qig
    import qig.methods.qig as qig_method

    calib = calibration(4, seed=2)
    results = []
    for tokens in (qig_method.PATH_TOKENS, 1):  # all K points in one pass, then one point per pass
        monkeypatch.setattr(qig_method, "PATH_TOKENS", tokens)
        model = tiny_llava(outliers=True)
        result = qig.quantize(model, QIGConfig(wbits=3, group_size=32, steps=4), calib, progress=False)
        results.append({(g.layer, g.group): (g.ratio, g.scales) for g in result.groups})
    assert results[0].keys() == results[1].keys()
    for key, (ratio, scales) in results[0].items():
        assert results[1][key][0] == ratio and torch.equal(results[1][key][1], scales), key
