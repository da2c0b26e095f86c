"""bf16 / fp16 tensors through the quantization primitives: float32 inside, one rounding to the dtype at the end."""

import pytest
import torch

from qig.errors import QigError
from qig.quant.activation import fake_quantize_activations
from qig.quant.fold import fold_scales_, scaled_fake_quantize
from qig.quant.gptq import GPTQSettings, Hessian, gptq_quantize
from qig.quant.spec import QuantSpec, activation_spec, dequantize, fake_quantize, quant_params, quantize_with

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES = {"fp32": torch.float32, **HALF}


def _norm_and_linear(dtype: torch.dtype, C: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    norm, lin = torch.nn.LayerNorm(C), torch.nn.Linear(C, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    return norm.to(dtype), lin.to(dtype)


def _scales(C: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.exp(torch.randn(C, generator=torch.Generator().manual_seed(seed)))  # [C] float32


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_a_fold_is_computed_in_float32_and_rounded_once(dtype):
    norm, lin = _norm_and_linear(dtype)
    w, b, W = (t.detach().clone() for t in (norm.weight, norm.bias, lin.weight))
    s = _scales()
    fold_scales_(norm, [lin], s)
    assert norm.weight.dtype == lin.weight.dtype == dtype
    assert torch.equal(norm.weight, (w.float() / s).to(dtype))
    assert torch.equal(norm.bias, (b.float() / s).to(dtype))
    assert torch.equal(lin.weight, (W.float() * s).to(dtype))


def test_a_float32_fold_is_the_in_place_arithmetic_of_before():
    norm, lin = _norm_and_linear(torch.float32)
    ref_norm, ref_lin = _norm_and_linear(torch.float32)
    s = _scales()
    fold_scales_(norm, [lin], s, offset=1.0)
    with torch.no_grad():  # the float32 fold as it was: in place, in the weights' dtype
        ref_norm.weight.add_(1.0).div_(s).sub_(1.0)
        ref_norm.bias.div_(s)
        ref_lin.weight.mul_(s.view(1, -1))
    for a, b in ((norm.weight, ref_norm.weight), (norm.bias, ref_norm.bias), (lin.weight, ref_lin.weight)):
        assert torch.equal(a, b)


def test_a_fold_that_overflows_float16_is_refused_before_anything_changes():
    norm, lin = _norm_and_linear(torch.float16)
    before = [t.detach().clone() for t in (norm.weight, norm.bias, lin.weight)]
    s = torch.full((64,), 1e-3)
    s[5] = 1e-6  # the norm's channel 5 would grow past 65504
    with pytest.raises(QigError, match=r"overflows torch.float16, which holds values up to 6.55e\+04; load the model"):
        fold_scales_(norm, [lin], s)
    assert all(torch.equal(t, b) for t, b in zip((norm.weight, norm.bias, lin.weight), before, strict=True))


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_a_candidate_quantizes_the_weight_its_fold_leaves(dtype):
    norm, lin = _norm_and_linear(dtype)
    s, spec = _scales(), QuantSpec(bits=3, group_size=32)
    candidate = scaled_fake_quantize(lin.weight.data, s, spec)  # Q(W s) / s, as the search scores it
    fold_scales_(norm, [lin], s)
    production = fake_quantize(lin.weight.data, spec)  # Q(W s), as RTN leaves the folded weight
    assert candidate.dtype == dtype
    assert torch.equal(candidate, (production.float() / s).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("spec", [QuantSpec(3, 128), QuantSpec(4, 32), QuantSpec(8, None, symmetric=True)], ids=str)
def test_quantizer_parameters_are_float32_and_the_saved_weight_decodes_exactly(dtype, spec):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(32, 256, generator=g) * torch.exp(torch.randn(1, 256, generator=g))).to(dtype)
    scale, zero = quant_params(w, spec)
    assert scale.dtype == zero.dtype == torch.float32
    assert torch.equal(scale, quant_params(w.float(), spec)[0])  # the same parameters as from the widened weight
    saved = fake_quantize(w, spec)
    assert saved.dtype == dtype
    # the export re-derives the codes from the saved weight and the kept parameters: bit for bit
    assert torch.equal(dequantize(quantize_with(saved, scale, zero, spec), scale, zero, spec).to(dtype), saved)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_the_straight_through_activation_quantizer_keeps_the_quantized_value_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 9, 64, generator=g) * torch.exp(2 * torch.randn(64, generator=g))).to(dtype)
    spec = activation_spec(8)
    plain = fake_quantize_activations(x, spec)
    z = x.clone().requires_grad_(True)
    through = fake_quantize_activations(z, spec)
    assert through.dtype == dtype
    assert torch.equal(through.detach(), plain)  # under autograd the value is still xq, bit for bit
    (grad,) = torch.autograd.grad(through.float().sum(), z)
    assert torch.equal(grad, torch.ones_like(z))  # and the gradient passes straight through


@pytest.mark.parametrize("dtype", HALF.values(), ids=HALF.keys())
def test_gptq_of_a_half_weight_works_in_float32_and_stores_what_it_fed_back(dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(512, 128, generator=g)
    W = torch.randn(24, 128, generator=g).to(dtype)
    h_half, h_wide = Hessian(128), Hessian(128)
    h_half.add(X.to(dtype))
    h_wide.add(X.to(dtype).float())
    assert h_half.H.dtype == torch.float32 and torch.equal(h_half.finish(), h_wide.finish())
    spec = QuantSpec(bits=3, group_size=32)
    r = gptq_quantize(W, h_half, spec, GPTQSettings(block_size=32))
    assert r.weight.dtype == dtype and r.scale.dtype == torch.float32
    codes = quantize_with(r.weight, r.scale, r.zero, spec)
    assert torch.equal(dequantize(codes, r.scale, r.zero, spec).to(dtype), r.weight)  # the export's decoding
    # GPTQ of the widened weight: the same grid decisions up to the rounding fed back, so close
    wide = gptq_quantize(W.float(), h_wide, spec, GPTQSettings(block_size=32))
    assert float((r.weight.float() - wide.weight).norm() / wide.weight.norm()) < 0.1
