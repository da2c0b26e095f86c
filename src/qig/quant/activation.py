"""The weight-activation fake-quant linear (METHOD.md section 2): y = Q_w(W) Q_a(x) + b.

Q_w quantizes the weight once (per output channel, symmetric, for the integer
W-A modes; the scheme's own spec otherwise): the linear keeps the dequantized
weight, as in weight-only modes. Q_a quantizes the input per token, symmetric
abs-max, at run time (``activation_spec(bits, number)``; FP4 numbers in
groups of 16 or 32 along the token's channels): a forward pre-hook on the
linear, so the model keeps its architecture and its state dict. Both go
through ``qig.quant.spec``'s ``quant_params`` / ``encode`` / ``decode``.
NVFP4 activations also have a per-tensor scale: a quantizer holds the one
calibrated for its linear (``tensor_scale``, what the export writes as
``input_global_scale``), or, without one, takes it from each tensor it
meets.

    >>> import torch
    >>> from qig.quant.activation import activation_spec_of, install_activation_quantizer_
    >>> from qig.quant.spec import activation_spec
    >>> lin = torch.nn.Linear(64, 8)
    >>> install_activation_quantizer_(lin, activation_spec(8))
    >>> activation_spec_of(lin).bits
    8

Under autograd the activation quantizer passes gradients straight through
(the straight-through estimator), so QIG can differentiate a W-A block.

A W-A model carries these quantizers on its decoder linears for good
(:func:`install_activation_quantizers`, given the linears; which ones is the
caller's model knowledge); :func:`activation_quantization` finds them on any
model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from qig.errors import QigError
from qig.quant.spec import QuantSpec, decode, encode, quant_params


def fake_quantize_activations(
    x: torch.Tensor, spec: QuantSpec, tensor_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token quantize-dequantize of ``x`` [..., C] (one scale per token, or per group of its C channels).

    tensor_scale: NVFP4's per-tensor scale (default: from ``x`` itself).
    """
    if not spec.dynamic:
        raise QigError(f"{spec.label()} is a weight quantizer; activations need activation_spec(bits)")
    rows = x.detach().reshape(-1, x.shape[-1])  # [tokens, C]
    scale, zero = quant_params(rows, spec, tensor_scale)  # [tokens, n_groups] each
    g = spec.group_size or rows.shape[-1]
    rows, scale, zero = rows.reshape(-1, g), scale.reshape(-1, 1), zero.reshape(-1, 1)  # [tokens * n_groups, g]
    xq = decode(encode(rows, scale, zero, spec), scale, zero).reshape(x.shape).to(x.dtype)
    if x.requires_grad:
        # Straight-through: value of xq, gradient of x. Exact in bf16 / fp16 too: xq - x (at most half a
        # step, and no larger than xq or x) fits the dtype, so x + (xq - x) is xq bit for bit.
        return x + (xq - x).detach()
    return xq


class ActivationQuantizer:
    """A forward pre-hook quantizing a linear's input per token with ``spec`` (and NVFP4's ``tensor_scale``)."""

    def __init__(self, spec: QuantSpec, tensor_scale: torch.Tensor | None = None) -> None:
        if not spec.dynamic:
            raise QigError(f"{spec.label()} is a weight quantizer; activations need activation_spec(bits)")
        self.spec = spec
        self.tensor_scale = tensor_scale

    def __call__(self, _module: torch.nn.Module, args: tuple) -> tuple:
        return (fake_quantize_activations(args[0], self.spec, self.tensor_scale), *args[1:])

    def __repr__(self) -> str:
        return f"ActivationQuantizer({self.spec.label()})"


def _hook_ids(module: torch.nn.Module) -> list[int]:
    return [k for k, h in module._forward_pre_hooks.items() if isinstance(h, ActivationQuantizer)]


def activation_spec_of(module: torch.nn.Module) -> QuantSpec | None:
    """The activation quantizer installed on ``module``, or None."""
    ids = _hook_ids(module)
    return module._forward_pre_hooks[ids[0]].spec if ids else None


def install_activation_quantizer_(
    linear: torch.nn.Linear, spec: QuantSpec, tensor_scale: torch.Tensor | None = None
) -> None:
    """Quantize ``linear``'s input per token at run time from now on (replacing a quantizer already there)."""
    remove_activation_quantizer_(linear)
    linear.register_forward_pre_hook(ActivationQuantizer(spec, tensor_scale), prepend=True)


def activation_tensor_scale(module: torch.nn.Module) -> torch.Tensor | None:
    """The calibrated per-tensor scale of ``module``'s activation quantizer (NVFP4), or None."""
    ids = _hook_ids(module)
    return module._forward_pre_hooks[ids[0]].tensor_scale if ids else None


def remove_activation_quantizer_(module: torch.nn.Module) -> bool:
    """Remove qig's activation quantizer from ``module``; True if there was one."""
    ids = _hook_ids(module)
    for k in ids:
        del module._forward_pre_hooks[k]
    return bool(ids)


def install_activation_quantizers(linears: Iterable[torch.nn.Linear], spec: QuantSpec) -> int:
    """Quantize the inputs of ``linears`` per token at run time from now on (a W-A model); returns how many.

    >>> import torch
    >>> from qig.quant.spec import activation_spec
    >>> install_activation_quantizers([torch.nn.Linear(8, 4), torch.nn.Linear(4, 2)], activation_spec(8))
    2
    """
    n = 0
    for lin in linears:
        install_activation_quantizer_(lin, spec)
        n += 1
    return n


def remove_activation_quantizers(model: torch.nn.Module) -> int:
    """Remove every qig activation quantizer from ``model``'s modules; returns how many were removed."""
    return sum(remove_activation_quantizer_(m) for m in model.modules())


def activation_quantization(model: torch.nn.Module) -> tuple[QuantSpec, int] | None:
    """The activation quantizer installed in ``model`` and on how many modules, or None.

    Any model works: every module is looked at, though qig only ever installs
    them on the decoder linears.

    >>> import torch
    >>> from qig.quant.spec import activation_spec
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    >>> activation_quantization(model) is None
    True
    >>> install_activation_quantizers(list(model), activation_spec(8))
    2
    >>> spec, n = activation_quantization(model)
    >>> (spec.bits, n)
    (8, 2)
    """
    specs = [s for s in map(activation_spec_of, model.modules()) if s is not None]
    return (specs[0], len(specs)) if specs else None


@contextlib.contextmanager
def quantized_activations(linears: Iterable[torch.nn.Module], spec: QuantSpec | None) -> Iterator[None]:
    """Quantize the inputs of ``linears`` for the duration (nothing when ``spec`` is None)."""
    if spec is None:
        yield
        return
    hook = ActivationQuantizer(spec)
    handles = [m.register_forward_pre_hook(hook, prepend=True) for m in linears]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
