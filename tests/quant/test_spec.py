"""QuantSpec: encode/decode round trip, fake-quant == packed-then-dequantized, error bounds, refusals."""

import pytest
import torch

from qig.errors import QigError
from qig.quant.spec import QuantSpec, decode, dequantize, encode, fake_quantize, quant_params, quantize, quantize_with

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPECS = [
    pytest.param(QuantSpec(bits, group, symmetric), id=f"w{bits}-{f'g{group}' if group else 'channel'}-{kind}")
    for bits in (2, 3, 4, 8)
    for group in (32, 128, None)
    for symmetric, kind in ((False, "asym"), (True, "sym"))
]


def _weights(dtype: torch.dtype, out: int = 16, inp: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[:, :3] *= 25.0  # outlier columns
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("spec", SPECS)
def test_codes_round_trip_through_decode_and_encode(spec, dtype):
    w = _weights(dtype)
    q, scale, zero = quantize(w, spec)
    n_groups = w.shape[1] // (spec.group_size or w.shape[1])
    assert scale.shape == zero.shape == (w.shape[0], n_groups) and scale.dtype == torch.float32
    assert q.dtype == (torch.int8 if spec.symmetric else torch.uint8)
    assert spec.qmin <= int(q.min()) and int(q.max()) <= spec.qmax
    w_hat = dequantize(q, scale, zero, spec)  # float32
    assert torch.equal(quantize_with(w_hat, scale, zero, spec), q)  # decode, then encode: the same integers
    g = spec.group_size or w.shape[1]
    cast = w_hat.to(dtype)
    if not (dtype == torch.bfloat16 and spec.bits == 8):  # bf16's 8 significant bits cannot hold 8-bit codes
        assert torch.equal(quantize_with(cast, scale, zero, spec), q)  # also from the weights in their dtype
    # the shared expressions, group by group
    groups = encode(w.reshape(-1, g), scale.reshape(-1, 1), zero.reshape(-1, 1), spec)
    assert torch.equal(decode(groups, scale.reshape(-1, 1), zero.reshape(-1, 1)).reshape(w.shape), w_hat)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("spec", SPECS)
def test_fake_quant_is_packed_then_dequantized_and_within_a_step(spec, dtype):
    w = _weights(dtype)
    q, scale, zero = quantize(w, spec)
    fake = fake_quantize(w, spec)
    assert fake.dtype == dtype
    assert torch.equal(fake, dequantize(q, scale, zero, spec).to(dtype))
    g = spec.group_size or w.shape[1]
    err = (dequantize(q, scale, zero, spec) - w.float()).abs().reshape(-1, g)  # [G, g]
    step = scale.reshape(-1, 1)
    # half a step from rounding; min-max's rounded zero point may push the top value up to a whole step
    bound = 0.5 if spec.symmetric else 1.0
    assert bool((err <= bound * step * (1 + 1e-5)).all())
    assert float(err.mean()) < 0.5 * float(step.mean())


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_an_all_zero_group_gets_a_usable_scale_and_stays_zero(symmetric):
    spec = QuantSpec(3, 32, symmetric)
    w = torch.randn(2, 64)
    w[1, :32] = 0.0
    scale, _ = quant_params(w, spec)
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    assert bool((fake_quantize(w, spec)[1, :32] == 0).all())


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: QuantSpec(4, 100).check(256, "q_proj"), "group_size 100 does not divide in_features 256 of q_proj"),
        (lambda: QuantSpec(4, 128).check(100), "use per-channel"),
        (lambda: QuantSpec(bits=1), "weight bits 1 not supported"),
        (lambda: QuantSpec(group_size=0), "must be a positive integer"),
    ],
    ids=["group-not-dividing", "no-divisor", "bits-1", "group-0"],
)
def test_invalid_settings_are_refused(build, message):
    with pytest.raises(QigError, match=message):
        build()
