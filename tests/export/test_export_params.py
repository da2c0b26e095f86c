"""Reading the integer codes back from fake-quantized weights, exactly (qig.export.params)."""

import pytest
import torch

from qig.errors import QigError
from qig.export.params import check_storable, from_params, recover
from qig.quant.gptq import GPTQSettings, Hessian, gptq_quantize
from qig.quant.spec import QuantSpec, activation_spec, fake_quantize, quantize


def _weights(seed: int, out: int = 64, inp: int = 256, dtype=torch.float32) -> torch.Tensor:
    """Gaussian weights with a few outlier columns (as after an AWQ/QIG scale is folded in)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[:, torch.randperm(inp, generator=g)[:4]] *= 30.0
    return w.to(dtype)


SPECS = {
    "w4-g128": QuantSpec(4, 128),
    "w3-g128": QuantSpec(3, 128),
    "w2-g64": QuantSpec(2, 64),
    "w8-g128": QuantSpec(8, 128),
    "w4-channel": QuantSpec(4, None),
    "w8-channel-sym": QuantSpec(8, None, symmetric=True),
    "w4-channel-sym": QuantSpec(4, None, symmetric=True),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# bf16 keeps 8 significant bits: 8-bit codes times a scale do not survive it (refused, see below).
CASES = [
    pytest.param(spec, dtype, id=f"{name}-{dname}")
    for name, spec in SPECS.items()
    for dname, dtype in DTYPES.items()
    if not (dtype == torch.bfloat16 and spec.bits == 8)
]


@pytest.mark.parametrize("spec, dtype", CASES)
def test_recovered_codes_are_the_fake_quant_codes(spec, dtype):
    w = _weights(0, dtype=dtype)
    w_hat = fake_quantize(w, spec)
    qw = recover(w_hat, spec, "lin")
    assert torch.equal(qw.dequantize(dtype), w_hat)  # bit for bit
    q, _, zero = quantize(w, spec)  # what the fake-quant path computed
    assert torch.equal(qw.q, q.to(torch.int16))
    assert torch.equal(qw.zero, zero)


def test_recovery_survives_top_codes_that_round_down():
    # A group whose smallest weight sits at -(k + 1/2) scales rounds its largest weight to qmax or
    # qmax - 1 depending on the last float bit; a naive re-derivation (max - min) / qmax then picks
    # another grid. The recovery must still return the fake-quant codes.
    spec = QuantSpec(4, 128)
    g = torch.Generator().manual_seed(0)
    s = torch.rand(512, 1, generator=g) * 0.1 + 0.01
    k = torch.randint(0, 15, (512, 1), generator=g).float()
    w = (torch.rand(512, 128, generator=g) * 15 - (k + 0.5)) * s
    w[:, :1], w[:, 1:2] = -(k + 0.5) * s, (14.5 - k) * s
    q, _, _ = quantize(w, spec)
    assert int((q.amax(1) < spec.qmax).sum()) > 0, "no group with a shortened span was exercised"
    w_hat = fake_quantize(w, spec)
    qw = recover(w_hat, spec, "lin")
    assert torch.equal(qw.q, q.to(torch.int16))
    assert torch.equal(qw.dequantize(), w_hat)


def test_8bit_codes_in_bfloat16_are_refused_not_guessed():
    spec = QuantSpec(8, 128)
    with pytest.raises(QigError, match="W8 g128 asym"):
        recover(fake_quantize(_weights(6, dtype=torch.bfloat16), spec), spec, "lin")


def test_gptq_codes_come_from_the_saved_parameters():
    spec = QuantSpec(3, 128)
    x = torch.randn(512, 256)
    h = Hessian(256)
    h.add(x)
    result = gptq_quantize(_weights(1), h, spec, GPTQSettings())
    qw = from_params(result.weight, result.scale, result.zero, spec, "lin")
    assert torch.equal(qw.dequantize(result.weight.dtype), result.weight)


def test_weights_off_the_grid_are_refused():
    with pytest.raises(QigError, match="not on a W4 g128 asym grid"):
        recover(_weights(2), QuantSpec(4, 128), "model.layers.0.q_proj")


def test_wrong_saved_parameters_are_refused():
    spec = QuantSpec(4, 128)
    w_hat = fake_quantize(_weights(3), spec)
    qw = recover(w_hat, spec, "lin")
    with pytest.raises(QigError, match="do not dequantize exactly"):
        from_params(w_hat, qw.scale * 1.01, qw.zero, spec, "lin")


def test_zero_points_outside_the_code_range_are_refused():
    spec = QuantSpec(4, 128)
    w = _weights(4).abs() + 0.5  # every weight positive: zero = round(-min / scale) < 0
    qw = recover(fake_quantize(w, spec), spec, "lin")
    assert float(qw.zero.min()) < 0
    with pytest.raises(QigError, match="zero point outside 0..15"):
        check_storable(qw, "lin")


def test_signed_codes_keep_the_differences():
    spec = QuantSpec(4, 128)
    qw = recover(fake_quantize(_weights(5), spec), spec, "lin")
    q, zero = qw.signed()
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    diff = q.reshape(-1, 128).int() - zero.reshape(-1, 1).int()
    assert torch.equal(diff, (qw.q.reshape(-1, 128) - qw.zero.reshape(-1, 1)).int())


@pytest.mark.parametrize(
    "spec, abits, fmt, serving",
    [
        pytest.param(QuantSpec(4, 128), 16, "pack-quantized", "W4A16 with zero points", id="w4a16-g128"),
        pytest.param(QuantSpec(3, 128), 16, "pack-quantized", "no kernel for 3-bit", id="w3a16-g128"),
        pytest.param(QuantSpec(8, 128), 16, "pack-quantized", "no Marlin path", id="w8a16-g128"),
        pytest.param(QuantSpec(8, None, symmetric=True), 8, "int-quantized", "W8A8 int8", id="w8a8"),
        pytest.param(QuantSpec(4, None, symmetric=True), 8, "int-quantized", "Dynamic4bitLinearKernel", id="w4a8"),
        pytest.param(QuantSpec(4, None, symmetric=True), 4, "int-quantized", "no integer W4A4", id="w4a4"),
    ],
)
def test_scheme_of_each_setting(spec, abits, fmt, serving):
    from qig.export.scheme import scheme_for

    s = scheme_for(spec, None if abits == 16 else activation_spec(abits))
    assert s.format == fmt and serving in s.serving
    assert s.weights["num_bits"] == spec.bits and s.weights["symmetric"] == spec.symmetric
    assert (s.input_activations is None) == (abits == 16)
    pytest.importorskip("compressed_tensors")
    scheme = s.quantization_scheme(["Linear"])  # the library accepts it
    assert scheme.weights.strategy == ("group" if spec.group_size else "channel")


def test_activation_bits_the_format_has_no_scheme_for_are_refused():
    from qig.export.scheme import scheme_for

    with pytest.raises(QigError, match="activation bits 6 cannot be exported"):
        scheme_for(QuantSpec(4, None, symmetric=True), activation_spec(6))
