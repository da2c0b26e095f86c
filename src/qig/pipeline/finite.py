"""Non-finite values refused where they enter the pipeline: the source weights and the hidden states.

The checks only read, so they change no result; each raises a
:class:`~qig.errors.QigError` naming the tensor and the likely cause.

Cost: a tensor is reduced to its minimum and maximum in one pass
(``torch.aminmax``: NaN propagates, an inf is an extreme), and the tensors of a
model are checked together, with one look at every tensor's two extremes;
the first tensor found non-finite is named. ``torch.isfinite(t).all()`` writes
a mask as large as the tensor first and costs about 30x more on a CPU
(``benchmarks/finite_checks.py``). The issue that asked for it said "sum
first": a sum costs the same pass, but in float16 it overflows to inf where no
entry is (about 2 x 10^4 entries of 3 do it), which would fall back to the
slow check on ordinary hidden states; the extremes never overflow.

    >>> import torch
    >>> first_non_finite([("a", torch.ones(3)), ("b", torch.tensor([1.0, float("nan")]))])
    'b'

    >>> check_decoder_weights(model, family_for(model))  # doctest: +SKIP
    >>> check_hidden(h, "layer 3's output on the FP stream x", 0, "load the model in float32")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qig.errors import QigError
from qig.models import ModelFamily, linears


def is_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite (integer, bool and empty tensors always are): one min/max pass."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(_extremes_finite(t))


def _extremes_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool on ``t``'s device: whether its minimum and maximum are finite (so every entry is)."""
    lo, hi = torch.aminmax(t.detach())
    return torch.isfinite(lo) & torch.isfinite(hi)


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding NaN or inf, else None; meta, empty and integer tensors are skipped.

    Every tensor is reduced on its device, and the verdicts come back together (one look, not one per tensor).
    """
    names, verdicts = [], []
    for name, t in named:
        if t.is_floating_point() and t.numel() and t.device.type != "meta":
            names.append(name)
            verdicts.append(_extremes_finite(t))
    if not names:
        return None
    ok = torch.stack([v.cpu() for v in verdicts])
    return None if bool(ok.all()) else names[int((~ok).nonzero()[0])]


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
    params = (
        (f"{path}.{name}", p.data) for path, linear in named for name, p in linear.named_parameters(recurse=False)
    )
    bad = first_non_finite(params)
    if bad is not None:
        raise QigError(
            f"the model's {bad} holds NaN or inf values; the checkpoint is corrupt "
            "(re-download or re-save it, or load it in a wider dtype such as float32 if it overflowed)"
        )


def check_hidden(h: torch.Tensor | None, where: str, batch: int, fix: str) -> None:
    """Refuse hidden states [b, T, C] with NaN or inf; ``where`` names the layer and stream, ``fix`` the way out."""
    if h is not None and not is_finite(h):
        raise QigError(f"{where} holds NaN or inf in calibration batch {batch}; {fix}")
