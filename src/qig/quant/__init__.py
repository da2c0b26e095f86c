"""Tensor-level quantization primitives (the bottom layer: nothing here imports upward)."""

from qig.quant.spec import QuantSpec, dequantize, fake_quantize, quant_params, quantize

__all__ = ["QuantSpec", "dequantize", "fake_quantize", "quant_params", "quantize"]
