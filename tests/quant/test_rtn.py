"""RTN of a set of linears: the weights become their fake-quant values; the parameters come back."""

import pytest
import torch

from qig.quant.rtn import rtn_
from qig.quant.spec import QuantSpec, dequantize, fake_quantize, quantize_with

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(
    "spec", [QuantSpec(4, 64), QuantSpec(8, None, symmetric=True)], ids=["w4-g64", "w8-channel-sym"]
)
def test_rtn_returns_the_parameters_that_reproduce_its_weights(spec, dtype):
    lin = torch.nn.Linear(128, 8).to(dtype)
    expected = fake_quantize(lin.weight.data, spec)
    (params,) = rtn_({"lin": lin}, spec).values()
    w = lin.weight.data
    assert torch.equal(w, expected)
    scale, zero = params["scale"], params["zero"]
    assert scale.shape == zero.shape == (8, 128 // (spec.group_size or 128))
    assert torch.equal(dequantize(quantize_with(w, scale, zero, spec), scale, zero, spec).to(dtype), w)
