"""Folding a channel scale into a pair of ops, leaving the FP function unchanged (METHOD.md section 3).

For a scale ``s`` (one per input channel of the linears): the previous op's
output channels are divided by ``s`` (a norm's weight and bias, or a linear's
rows and bias), the linears' columns are multiplied by ``s``.

    >>> import torch
    >>> from qig.quant.fold import fold_scales_
    >>> norm, lin = torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)
    >>> fold_scales_(norm, [lin], torch.full((8,), 2.0))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qig.errors import QigError


@torch.no_grad()
def fold_scales_(
    prev: torch.nn.Module, linears: Sequence[torch.nn.Linear], scales: torch.Tensor, offset: float = 0.0
) -> None:
    """Divide ``prev``'s output channels by ``scales`` [C]; multiply the linears' input columns by it.

    offset: a norm that multiplies by ``offset + weight`` (Gemma's RMSNorm: ``1 + w``) gets
    ``w' = (offset + w) / s - offset``, so that its factor is divided by ``s``.
    """
    weight = getattr(prev, "weight", None)
    if weight is None:
        raise QigError(f"cannot fold a scale into {type(prev).__name__}: it has no weight to absorb 1/s")
    C = scales.numel()
    if weight.shape[0] != C:
        raise QigError(f"scale of {C} channels does not match the {weight.shape[0]} outputs of {type(prev).__name__}")
    if weight.dim() == 1:  # norm: weight [C]
        weight.add_(offset).div_(scales.to(weight)).sub_(offset)
    else:  # linear: weight [C, in]
        weight.div_(scales.to(weight).view(-1, 1))
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.div_(scales.to(bias))
    for lin in linears:
        if lin.in_features != C:
            raise QigError(f"scale of {C} channels does not match in_features {lin.in_features} of a linear")
        lin.weight.mul_(scales.to(lin.weight).view(1, -1))  # weight [out, C]


def scaled_fake_quantize(weight: torch.Tensor, scales: torch.Tensor, spec) -> torch.Tensor:
    """``Q(W * s) / s``: the weight a candidate scale leaves, quantized by the production quantizer.

    weight: [out, C]; scales: [C]. Returns a tensor like ``weight``.
    """
    from qig.quant.spec import fake_quantize

    s = scales.to(device=weight.device, dtype=torch.float32).view(1, -1)
    return (fake_quantize(weight.float() * s, spec) / s).to(weight.dtype)
