"""One quantization spec for every use: search, fake-quant, packing, dequant.

METHOD.md section 2. A spec quantizes a tensor [rows, in] per row, in groups of
``group_size`` consecutive input channels (``None``: one scale per row). Its
``number`` says what a code is:

- ``"int"``: integers, min-max with a zero point (weight-only default) or
  abs-max on a signed grid (``symmetric``);
- ``"fp8"``: FP8 E4M3 values (max 448), abs-max scale per row (FP8_DYNAMIC);
- ``"nvfp4"``: FP4 E2M1 values (max 6) in groups of 16, each group's scale an
  FP8 E4M3 value times ``1 / global_scale``, one float32 global scale per
  tensor (``448 * 6 / max|w|``);
- ``"mxfp4"``: FP4 E2M1 values in groups of 32, each group's scale a power of
  two (E8M0) that puts the group's largest value in [4, 8) steps (above 6:
  clipped, the OCP MX rule).

Activations (``dynamic``) are quantized at run time per token (a row of
[tokens, C]), in groups for the FP4 numbers, so weights and activations go
through the same functions. Every number keeps the same three steps:
:func:`quant_params` (float32 scale and zero per group), :func:`encode` (the
code, as float32) and :func:`decode` (``(q - zero) * scale``); for NVFP4 the
scale is the effective one, ``fp8_scale / global_scale``, the value the
compressed-tensors kernels multiply by.

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

FP8_MAX = 448.0  # E4M3 (float8_e4m3fn)
FP4_MAX = 6.0  # E2M1
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the non-negative E2M1 values, in code order


@dataclass(frozen=True)
class FloatNumber:
    """A floating-point number format's fixed shape: its bits, its largest value, its group size (None: per row)."""

    bits: int
    max: float
    group_size: int | None


# The floating-point numbers (data): bits and group size are fixed by the format.
FLOAT_NUMBERS = {
    "fp8": FloatNumber(8, FP8_MAX, None),
    "nvfp4": FloatNumber(4, FP4_MAX, 16),
    "mxfp4": FloatNumber(4, FP4_MAX, 32),
}
NUMBERS = ("int", *FLOAT_NUMBERS)


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor [rows, in] is quantized: a weight [out, in], or activations [tokens, C].

    bits: 2..8 for integer weights, 4..16 for integer activations. group_size:
    consecutive input channels sharing a scale, or ``None`` for one scale per
    row (per output channel; per token for activations). symmetric: abs-max
    with a signed grid instead of min-max with a zero point. dynamic: an
    activation quantizer, its scales computed at run time from the tensor
    itself; always symmetric (``activation_spec`` builds one). number: "int",
    "fp8", "nvfp4" or "mxfp4" (see the module); the float numbers fix bits and
    group size and are symmetric.

    >>> QuantSpec(bits=4, group_size=16, symmetric=True, number="nvfp4").label()
    'W4 g16 nvfp4'
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    dynamic: bool = False
    number: str = "int"

    def __post_init__(self) -> None:
        if self.number not in NUMBERS:
            raise QigError(f"number format {self.number!r} is not supported; use one of: {', '.join(NUMBERS)}")
        if self.number != "int":
            self._check_float()
            return
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

    def _check_float(self) -> None:
        fmt = FLOAT_NUMBERS[self.number]
        g = "per channel (per token for activations)" if fmt.group_size is None else f"in groups of {fmt.group_size}"
        if self.bits != fmt.bits or self.group_size != fmt.group_size or not self.symmetric:
            raise QigError(
                f"{self.number} quantizes {fmt.bits}-bit symmetric values {g}; use bits={fmt.bits}, "
                f"group_size={fmt.group_size}, symmetric=True (or a scheme name: --scheme)"
            )

    @property
    def is_float(self) -> bool:
        """Whether codes are floating-point values (fp8, nvfp4, mxfp4) rather than integers."""
        return self.number != "int"

    def check(self, in_features: int, name: str = "weight") -> None:
        """Refuse a group size that does not divide ``in_features``."""
        g = self.group_size
        if g is not None and in_features % g != 0:
            divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0]
            hint = f"use a divisor such as {', '.join(map(str, divisors))}" if divisors else "use per-channel"
            raise QigError(f"group_size {g} does not divide in_features {in_features} of {name}; {hint}")

    @property
    def qmin(self) -> float:
        if self.is_float:
            return -FLOAT_NUMBERS[self.number].max
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> float:
        if self.is_float:
            return FLOAT_NUMBERS[self.number].max
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def label(self) -> str:
        kind = self.number if self.is_float else ("sym" if self.symmetric else "asym")
        if self.dynamic:
            g = "per-token" if self.group_size is None else f"per-token g{self.group_size}"
            return f"A{self.bits} {g} {kind} dynamic"
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"W{self.bits} {g} {kind}"


def activation_spec(bits: int, number: str = "int") -> QuantSpec:
    """The activation quantizer of W-A modes: per token (in groups for FP4 numbers), symmetric abs-max, dynamic.

    >>> activation_spec(8).label()
    'A8 per-token sym dynamic'
    >>> activation_spec(8, "fp8").label()
    'A8 per-token fp8 dynamic'
    """
    group = FLOAT_NUMBERS[number].group_size if number in FLOAT_NUMBERS else None
    return QuantSpec(bits=bits, group_size=group, symmetric=True, dynamic=True, number=number)


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


def global_scale(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """NVFP4's per-tensor scale ``448 * 6 / max|w|`` (float32 [1]; 1 for an all-zero tensor); None for other numbers.

    It maps the tensor's largest group onto the largest FP8 group scale.

    >>> global_scale(torch.tensor([[3.0, -12.0]]), QuantSpec(4, 16, True, number="nvfp4"))
    tensor([224.])
    """
    if spec.number != "nvfp4":
        return None
    top = w.detach().abs().amax().float().reshape(1)
    return torch.where(top > 0, FP8_MAX * FP4_MAX / top, torch.ones_like(top))


def round_fp8(x: torch.Tensor) -> torch.Tensor:
    """The nearest FP8 E4M3 value (ties to even; beyond +-448: +-448), as float32."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def round_fp4(x: torch.Tensor) -> torch.Tensor:
    """The nearest FP4 E2M1 value (ties to the even code; beyond +-6: +-6), as float32.

    E2M1 steps by 0.5 below 2, by 1 from 2 to 4 and by 2 from 4 to 6, so each range
    is a scaled integer rounding (``torch.round``: ties to even, which is the even
    code at every midpoint).

    >>> round_fp4(torch.tensor([0.25, 0.75, 1.25, 2.5, 5.0, -7.0]))
    tensor([ 0.,  1.,  1.,  2.,  4., -6.])
    """
    a = x.float().abs().clamp(max=FP4_MAX)
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return torch.copysign(q, x.float())


def _mx_scale(top: torch.Tensor) -> torch.Tensor:
    """MXFP4's group scale: 2^(e - 2), e the exponent of max|w|, one higher from mantissa 1.75 on.

    2 is E2M1's largest exponent, so a group's largest value lands in [4, 8) steps and
    above 6 is clipped (the OCP MX rule); from 1.75 on the next power is nearer
    (compressed-tensors' and llm-compressor's rounding of the group maximum).
    """
    mantissa, exp = torch.frexp(top.float())  # top = mantissa * 2^exp, mantissa in [0.5, 1): exact
    exp = torch.where(mantissa >= 0.875, exp, exp - 1).float()  # 2 * mantissa >= 1.75: the next power
    return torch.where(top > 0, torch.exp2((exp - 2).clamp(-127, 127)), torch.ones_like(top))


def quant_params(
    w: torch.Tensor, spec: QuantSpec, tensor_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group: both [out, n_groups] (float32).

    tensor_scale: NVFP4's per-tensor scale (default: :func:`global_scale` of ``w``); the returned scale is
    then the effective ``fp8_scale / global_scale``.
    """
    out_features = w.shape[0]
    wg = _grouped(w.float(), spec)  # [G, g]
    if spec.is_float:
        scale = _float_scales(wg.abs().amax(dim=1), spec, w, tensor_scale)
        return scale.reshape(out_features, -1), torch.zeros_like(scale).reshape(out_features, -1)
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


def _float_scales(top: torch.Tensor, spec: QuantSpec, w: torch.Tensor, gs: torch.Tensor | None) -> torch.Tensor:
    """Per-group scales [G] of a float number from the groups' max |w| [G]."""
    if spec.number == "mxfp4":
        return _mx_scale(top)
    if spec.number == "nvfp4":
        gs = global_scale(w, spec) if gs is None else gs.float().reshape(1).to(top.device)
        fp8 = round_fp8(gs * (top / FP4_MAX))  # the stored FP8 group scale
        fp8 = torch.where(fp8 > 0, fp8, torch.full_like(fp8, 0.125))  # an underflowing group: FP8's eps
        return fp8 / gs
    scale = top / FP8_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The rounding step, for given params: ``clamp(round(w / scale) + zero, qmin, qmax)`` as float32.

    ``round`` is to the nearest integer, or for float numbers to the nearest
    value of the number (ties to even). Shapes broadcast (e.g. w [G, g] with
    scale [G, 1], or one column w [out] with scale [out], as GPTQ quantizes).
    Every quantized value in qig goes through this one expression.
    """
    if spec.number == "fp8":
        return round_fp8(torch.clamp(w.float() / scale + zero, spec.qmin, spec.qmax))
    if spec.is_float:
        return round_fp4(torch.clamp(w.float() / scale + zero, spec.qmin, spec.qmax))
    return torch.clamp(torch.round(w.float() / scale) + zero, spec.qmin, spec.qmax)


def decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The dequantization step, for given params: ``(q - zero) * scale`` in float32 (shapes broadcast)."""
    return (q.float() - zero) * scale


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes [out, in] of ``w`` for given per-group scale and zero [out, n_groups] (e.g. GPTQ's)."""
    wg = _grouped(w.float(), spec)  # [G, g]
    q = encode(wg, scale.reshape(-1, 1), zero.reshape(-1, 1), spec)
    return q.reshape(w.shape).to(code_dtype(spec))


def code_dtype(spec: QuantSpec) -> torch.dtype:
    """How codes are held: int8 (int16 above 8 bits) symmetric, uint8 asymmetric, float32 for float numbers."""
    if spec.is_float:
        return torch.float32
    return (torch.int8 if spec.bits <= 8 else torch.int16) if spec.symmetric else torch.uint8


def quantize(
    w: torch.Tensor, spec: QuantSpec, tensor_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [out, in] (:func:`code_dtype`), scale and zero [out, n_groups]."""
    scale, zero = quant_params(w, spec, tensor_scale)
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
