"""One quantization spec for every use: search, fake-quant, packing, dequant.

METHOD.md section 2. Weight-only modes quantize per output row in groups of
``group_size`` consecutive input channels, asymmetric min-max; weight-activation
modes quantize weights per output channel, symmetric abs-max, and activations
per token, symmetric abs-max, at run time (``dynamic``): for a tensor [tokens, C]
that is one scale per row, the per-output-channel rule of the weights, so both
go through the same functions.

    >>> import torch
    >>> from qig.quant.spec import QuantSpec, fake_quantize
    >>> spec = QuantSpec(bits=4, group_size=128)
    >>> w = torch.randn(8, 256)
    >>> (fake_quantize(w, spec) - w).abs().max() < 0.5
    tensor(True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qig.errors import QigError


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor [rows, in] is quantized: a weight [out, in], or activations [tokens, C].

    bits: 2..8 for weights, 4..16 for activations. group_size: consecutive
    input channels sharing a scale, or ``None`` for one scale per row (per
    output channel; per token for activations). symmetric: abs-max with a
    signed grid (W-A modes) instead of min-max with a zero point. dynamic:
    an activation quantizer, its scales computed at run time from the tensor
    itself; always symmetric and per row (``activation_spec`` builds one).
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.dynamic:
            if not isinstance(self.bits, int) or not 4 <= self.bits <= 16:
                raise QigError(f"activation bits {self.bits!r} not supported; use an integer from 4 to 16")
            if not self.symmetric or self.group_size is not None:
                raise QigError("activations are quantized per token, symmetric: use symmetric=True, group_size=None")
            return
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise QigError(f"weight bits {self.bits!r} not supported; use an integer from 2 to 8")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise QigError(f"group_size {self.group_size!r} must be a positive integer, or None for per-channel")

    def check(self, in_features: int, name: str = "weight") -> None:
        """Refuse a group size that does not divide ``in_features``."""
        g = self.group_size
        if g is not None and in_features % g != 0:
            divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0]
            hint = f"use a divisor such as {', '.join(map(str, divisors))}" if divisors else "use per-channel"
            raise QigError(f"group_size {g} does not divide in_features {in_features} of {name}; {hint}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def label(self) -> str:
        if self.dynamic:
            return f"A{self.bits} per-token sym dynamic"
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"W{self.bits} {g} {'sym' if self.symmetric else 'asym'}"


def activation_spec(bits: int) -> QuantSpec:
    """The activation quantizer of W-A modes: per token, symmetric abs-max, dynamic.

    >>> activation_spec(8).label()
    'A8 per-token sym dynamic'
    """
    return QuantSpec(bits=bits, group_size=None, symmetric=True, dynamic=True)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What qig computes in for tensors of ``dtype``: float32, or the tensor's own dtype if wider.

    bf16 and fp16 models are searched and quantized in their dtype, with sums,
    folds and quantizer parameters in float32.

    >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    # w: [out, in] -> [out * n_groups, group]
    spec.check(w.shape[-1])
    g = spec.group_size or w.shape[-1]
    return w.reshape(-1, g)


def quant_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group: both [out, n_groups] (float32)."""
    out_features = w.shape[0]
    wg = _grouped(w.float(), spec)  # [G, g]
    if spec.symmetric:
        scale = wg.abs().amax(dim=1) / spec.qmax
        zero = torch.zeros_like(scale)
    else:
        wmin, wmax = wg.amin(dim=1), wg.amax(dim=1)
        scale = (wmax - wmin) / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: any scale is exact
        zero = torch.round(-wmin / scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.reshape(out_features, -1), zero.reshape(out_features, -1)


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The rounding step, for given params: ``clamp(round(w / scale) + zero, qmin, qmax)`` as float32.

    Shapes broadcast (e.g. w [G, g] with scale [G, 1], or one column w [out]
    with scale [out], as GPTQ quantizes). Every quantized value in qig goes
    through this one expression.
    """
    return torch.clamp(torch.round(w.float() / scale) + zero, spec.qmin, spec.qmax)


def decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The dequantization step, for given params: ``(q - zero) * scale`` in float32 (shapes broadcast)."""
    return (q.float() - zero) * scale


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes [out, in] of ``w`` for given per-group scale and zero [out, n_groups] (e.g. GPTQ's)."""
    wg = _grouped(w.float(), spec)  # [G, g]
    q = encode(wg, scale.reshape(-1, 1), zero.reshape(-1, 1), spec)
    dtype = (torch.int8 if spec.bits <= 8 else torch.int16) if spec.symmetric else torch.uint8
    return q.reshape(w.shape).to(dtype)


def quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes [out, in], scale and zero [out, n_groups].

    Codes are stored as int8 (int16 above 8 bits) for symmetric specs, uint8 for asymmetric ones.
    """
    scale, zero = quant_params(w, spec)
    return quantize_with(w, scale, zero, spec), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Back to float32 [out, in] from codes and per-group scale/zero."""
    g = spec.group_size or q.shape[-1]
    w = decode(q.reshape(-1, g), scale.reshape(-1, 1), zero.reshape(-1, 1))  # [G, g]
    return w.reshape(q.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize, in ``w``'s dtype: the function every method and the export share."""
    q, scale, zero = quantize(w, spec)
    return dequantize(q, scale, zero, spec).to(w.dtype)
