"""Folding a channel scale into a pair of ops, leaving the FP function unchanged (METHOD.md section 3).

For a scale ``s`` (one per input channel of the linears): the previous op's
output channels are divided by ``s`` (a norm's weight and bias, or a linear's
rows and bias), the linears' columns are multiplied by ``s``. A bf16 / fp16
model is folded in float32 and cast back once, so each weight is rounded to
its dtype once, not once per operation.

    >>> import torch
    >>> from qig.quant.fold import fold_scales_
    >>> norm, lin = torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)
    >>> fold_scales_(norm, [lin], torch.full((8,), 2.0))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qig.errors import QigError
from qig.quant.spec import QuantSpec, compute_dtype, fake_quantize


def check_scale(s: torch.Tensor, layer: int, group: str, where: str = "") -> None:
    """Refuse a saved channel scale that is not a 1-D float tensor or has entries that are NaN, inf, zero or negative.

    ``where`` prefixes the message (the file the scale came from). A fold divides
    the previous op by ``s`` and multiplies the linears by it, so every entry must
    be finite and positive.

    >>> check_scale(torch.ones(8), 0, "attn_in")
    >>> check_scale(torch.zeros(8), 3, "mlp_in")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    qig.errors.QigError: layer 3 mlp_in: 8 of its 8 scales are zero or negative; ...
    """
    fix = "a scale must be a finite positive number; re-run the search, or pass the search.safetensors of a good run"
    if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.numel() == 0:
        shape = list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise QigError(f"{where}scales.{layer}.{group} must be a 1-D tensor, one scale per channel; got shape {shape}")
    if not s.is_floating_point():
        raise QigError(f"{where}scales.{layer}.{group} must hold floating-point scales, got {s.dtype}; {fix}")
    bad = int((~torch.isfinite(s)).sum())
    if bad:
        raise QigError(f"{where}layer {layer} {group}: {bad} of its {s.numel()} scales are NaN or inf; {fix}")
    bad = int((s <= 0).sum())
    if bad:
        raise QigError(f"{where}layer {layer} {group}: {bad} of its {s.numel()} scales are zero or negative; {fix}")


@torch.no_grad()
def fold_scales_(
    prev: torch.nn.Module, linears: Sequence[torch.nn.Linear], scales: torch.Tensor, offset: float = 0.0
) -> None:
    """Divide ``prev``'s output channels by ``scales`` [C]; multiply the linears' input columns by it.

    offset: a norm that multiplies by ``offset + weight`` (Gemma's RMSNorm: ``1 + w``) gets
    ``w' = (offset + w) / s - offset``, so that its factor is divided by ``s``.
    Computed in float32 (``compute_dtype``) and cast back once; a fold that would
    overflow the model's dtype is refused before any tensor is changed.
    """
    weight = getattr(prev, "weight", None)
    if weight is None:
        raise QigError(f"cannot fold a scale into {type(prev).__name__}: it has no weight to absorb 1/s")
    C = scales.numel()
    if weight.shape[0] != C:
        raise QigError(f"scale of {C} channels does not match the {weight.shape[0]} outputs of {type(prev).__name__}")
    for lin in linears:
        if lin.in_features != C:
            raise QigError(f"scale of {C} channels does not match in_features {lin.in_features} of a linear")
    s = scales.to(weight.device, compute_dtype(weight.dtype))  # [C]
    folded: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its new value in the compute dtype)
    if weight.dim() == 1:  # norm: weight [C]
        folded.append((weight, (weight.to(s.dtype) + offset) / s - offset))
    else:  # linear: weight [C, in]
        folded.append((weight, weight.to(s.dtype) / s.view(-1, 1)))
    bias = getattr(prev, "bias", None)
    if bias is not None:
        folded.append((bias, bias.to(s.dtype) / s.to(bias.device)))
    for lin in linears:  # weight [out, C]
        folded.append((lin.weight, lin.weight.to(s.dtype) * s.to(lin.weight.device).view(1, -1)))
    for param, value in folded:
        if param.dtype != value.dtype and _overflows(value, param.dtype):
            raise QigError(
                f"folding a channel scale (from {float(s.min()):.3g} to {float(s.max()):.3g}) into "
                f"{type(prev).__name__} and its linears overflows {param.dtype}, which holds values up to "
                f"{torch.finfo(param.dtype).max:.3g}; load the model in bfloat16 or float32"
            )
    for param, value in folded:
        param.copy_(value)  # the one cast back to the parameter's dtype


def _overflows(value: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether finite ``value`` becomes inf when cast to the narrower ``dtype``."""
    return bool(torch.isfinite(value).all()) and not bool(torch.isfinite(value.to(dtype)).all())


def scaled_fake_quantize(weight: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q(W * s) / s``: the weight a candidate scale leaves, quantized by the production quantizer.

    weight: [out, C]; scales: [C]. Returns a tensor like ``weight``. ``W * s`` is
    rounded to the weight's dtype first, as ``fold_scales_`` leaves it, so a
    bf16 candidate is quantized exactly as its fold would be.
    """
    s = scales.to(device=weight.device, dtype=torch.float32).view(1, -1)
    folded = (weight.float() * s).to(weight.dtype)  # what the fold leaves in the weight's dtype
    return (fake_quantize(folded, spec).float() / s).to(weight.dtype)
