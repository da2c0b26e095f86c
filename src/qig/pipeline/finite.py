"""Non-finite values refused where they enter the pipeline: the source weights and the hidden states.

The checks only read (``torch.isfinite(t).all()``, one per tensor), so they
change no result; each raises a :class:`~qig.errors.QigError` naming the tensor
and the likely cause.

    >>> check_decoder_weights(model, family_for(model))  # doctest: +SKIP
    >>> check_hidden(h, "layer 3's output on the FP stream x", 0, "load the model in float32")  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from qig.errors import QigError
from qig.models import ModelFamily, linears


def is_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite (integer and bool tensors always are)."""
    return bool(torch.isfinite(t).all())


def check_decoder_weights(model: torch.nn.Module, family: ModelFamily) -> None:
    """Refuse a model whose decoder linears (weights, biases) hold NaN or inf: the checkpoint is corrupt.

    Layers on the meta device (streamed from disk) are checked as they arrive (:func:`check_layer_weights`).
    """
    _check_linears(family.decoder_linears(model).items())


def check_layer_weights(layer: torch.nn.Module, index: int, family: ModelFamily) -> None:
    """The same check for one decoder layer, named as the model names it."""
    prefix = f"{family.layers}.{index}."
    _check_linears((prefix + n, m) for n, m in linears(layer).items())


def _check_linears(named) -> None:
    for path, linear in named:
        for name, p in linear.named_parameters(recurse=False):
            if p.device.type == "meta":
                continue
            if not is_finite(p.data):
                raise QigError(
                    f"the model's {path}.{name} holds NaN or inf values; the checkpoint is corrupt "
                    "(re-download or re-save it, or load it in a wider dtype such as float32 if it overflowed)"
                )


def check_hidden(h: torch.Tensor | None, where: str, batch: int, fix: str) -> None:
    """Refuse hidden states [b, T, C] with NaN or inf; ``where`` names the layer and stream, ``fix`` the way out."""
    if h is not None and not is_finite(h):
        raise QigError(f"{where} holds NaN or inf in calibration batch {batch}; {fix}")
