"""The integers behind fake-quantized weights, exactly (the export's first step).

``qig quantize`` saves fake-quantized weights ``w_hat = decode(q, scale, zero)``
(``qig.quant.spec``) and keeps every quantizer's ``scale`` and ``zero`` per
group (RTN's and GPTQ's, ``qig.quant.stored``). The export needs the integer
codes ``q`` and parameters that reproduce every saved value bit for bit:

- from the stored parameters (:func:`from_params`): ``q = encode(w_hat, scale,
  zero)`` with the shared quantizer;
- a fallback for folders that kept none, written by an older qig or another
  tool (:func:`recover`): the grid is read back from the weights. Min-max RTN
  puts each group's smallest weight on code 0 and its largest on code
  ``qmax`` (or ``qmax - 1`` when the top value rounds down), so the span ``n``
  of codes is found by trying ``n = qmax, qmax - 1, ...`` until every
  ``(w - min) / ((max - min) / n)`` is an integer. The scale is then the
  float32 value inside the interval of scales that reproduce every weight,
  verified by decoding.

Either way the result is checked: ``decode(q, scale, zero)`` cast to the
weight's dtype must equal the saved weight exactly, or the export refuses.

    >>> import torch
    >>> from qig.quant.spec import QuantSpec, dequantize, quantize
    >>> spec = QuantSpec(bits=4, group_size=128)
    >>> q, scale, zero = quantize(torch.randn(8, 256), spec)
    >>> w_hat = dequantize(q, scale, zero, spec)
    >>> torch.equal(from_params(w_hat, scale, zero, spec, "demo").q, q.to(torch.int16))
    True
    >>> torch.equal(recover(w_hat, spec, "demo").dequantize(w_hat.dtype), w_hat)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qig.errors import QigError
from qig.quant.spec import QuantSpec, decode, encode


@dataclass(frozen=True)
class QuantizedWeight:
    """One linear's integer codes and the parameters that dequantize them to the saved weight.

    q: [out, in] int16, qig's convention (``0..2^b-1`` asymmetric, signed
    symmetric), or float32 values of a float number (fp8, nvfp4, mxfp4).
    scale, zero: [out, n_groups] float32 (zero holds integers; NVFP4's scale
    is the effective ``fp8 / global_scale``). global_scale: NVFP4's [1].
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    global_scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``decode(q, scale, zero)`` per group, in ``dtype``: [out, in]."""
        g = self.spec.group_size or self.q.shape[1]
        w = decode(self.q.reshape(-1, g), self.scale.reshape(-1, 1), self.zero.reshape(-1, 1))  # [G, g]
        return w.reshape(self.q.shape).to(dtype)

    def signed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and zero points in compressed-tensors' signed convention: both int8.

        compressed-tensors keeps integers in ``[-2^(b-1), 2^(b-1)-1]``;
        shifting the codes and the zero point by ``2^(b-1)`` leaves ``q - zero``
        unchanged.
        """
        offset = 0 if self.spec.symmetric else 2 ** (self.spec.bits - 1)
        return (self.q - offset).to(torch.int8), (self.zero - offset).to(torch.int8)


def from_params(
    w_hat: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: QuantSpec,
    name: str,
    global_scale: torch.Tensor | None = None,
):
    """Codes of ``w_hat`` [out, in] for stored per-group ``scale``/``zero`` [out, n_groups], checked exactly.

    global_scale: NVFP4's per-tensor scale, which the run stored with them (required for NVFP4).
    """
    g = spec.group_size or w_hat.shape[1]
    spec.check(w_hat.shape[1], name)
    if spec.number == "nvfp4" and global_scale is None:
        raise QigError(f"{name}: the run stored no NVFP4 global_scale; export the folder 'qig quantize' wrote")
    s, z = scale.float().reshape(-1, 1), zero.float().reshape(-1, 1)
    q = encode(w_hat.reshape(-1, g), s, z, spec).to(torch.float32 if spec.is_float else torch.int16)  # [G, g]
    gs = None if global_scale is None else global_scale.float().reshape(1)
    qw = QuantizedWeight(q.reshape(w_hat.shape), s.reshape(scale.shape), z.reshape(zero.shape), spec, gs)
    _check_exact(qw, w_hat, name, "the stored scales and zero points")
    return qw


@torch.no_grad()
def recover(w_hat: torch.Tensor, spec: QuantSpec, name: str) -> QuantizedWeight:
    """Codes, scale and zero point of fake-quantized ``w_hat`` [out, in], read back exactly from its values."""
    out_f, in_f = w_hat.shape
    spec.check(in_f, name)
    if spec.is_float:
        raise QigError(
            f"{name}: a {spec.number} folder without stored quantizer parameters cannot be read back; export the "
            "unchanged folder 'qig quantize' wrote (search.safetensors keeps them)"
        )
    g = spec.group_size or in_f
    w = w_hat.detach().reshape(-1, g)  # [G, g], the saved dtype
    x = w.double()
    # |t - round(t)| allowed when reading codes back: the saved dtype's rounding of up to qmax steps.
    tol = min(0.45, 0.05 + spec.qmax * torch.finfo(w.dtype).eps)
    if spec.symmetric:
        q, zero = _codes_symmetric(x, spec, tol)
    else:
        q, zero = _codes_asymmetric(x, spec, tol)
    if q is None:
        raise QigError(
            f"the weights of {name} are not on a {spec.label()} grid (some group fits no scale); "
            "export a folder written by 'qig quantize' with the setting in its search.json"
        )
    scale = _exact_scale(w, q, zero)  # [G] float32
    qw = QuantizedWeight(
        q.to(torch.int16).reshape(out_f, in_f),
        scale.reshape(out_f, -1),
        zero.float().reshape(out_f, -1),
        spec,
    )
    _check_exact(qw, w_hat, name, "the recovered grid")
    return qw


def _codes_asymmetric(x: torch.Tensor, spec: QuantSpec, tol: float):
    """Codes [G, g] and zero points [G] (float64) of groups x [G, g]; None if some group fits no span."""
    lo, hi = x.amin(1), x.amax(1)  # [G]
    q = torch.zeros_like(x)
    zero = torch.zeros_like(lo)
    todo = hi > lo
    # A constant group: the value v is (1 - 0) * v, (0 - 1) * (-v) or (0 - 0) * 1.
    const = ~todo
    v = lo[const]
    q[const] = (v > 0).double().unsqueeze(1).expand(-1, x.shape[1])
    zero[const] = (v < 0).double()
    for n in range(spec.qmax, 0, -1):
        if not todo.any():
            break
        idx = todo.nonzero().squeeze(1)
        s = (hi[idx] - lo[idx]) / n  # [k]
        t = (x[idx] - lo[idx, None]) / s[:, None]  # [k, g]
        k = torch.round(t)
        ok = ((t - k).abs() <= tol).all(1) & (k.amax(1) == n)
        q[idx[ok]] = k[ok]
        zero[idx[ok]] = torch.round(-lo[idx[ok]] / s[ok])
        todo[idx[ok]] = False
    return (None, None) if todo.any() else (q, zero)


def _codes_symmetric(x: torch.Tensor, spec: QuantSpec, tol: float):
    """Codes [G, g] and zero points [G] (zeros) of groups x [G, g]; None if some group fits no scale."""
    top = x.abs().amax(1)  # [G]
    q = torch.zeros_like(x)
    todo = top > 0
    for n in range(spec.qmax, 0, -1):
        if not todo.any():
            break
        idx = todo.nonzero().squeeze(1)
        t = x[idx] * (n / top[idx, None])  # [k, g]
        k = torch.round(t)
        ok = ((t - k).abs() <= tol).all(1) & (k.abs().amax(1) == n)
        q[idx[ok]] = k[ok]
        todo[idx[ok]] = False
    return (None, None) if todo.any() else (q, torch.zeros_like(top))


def _exact_scale(w: torch.Tensor, q: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per group a float32 scale s with ``decode(q, s, zero)`` rounding to w in w's dtype: [G].

    Each weight w_i = (q_i - z) * s, rounded to w's dtype, bounds s to the
    interval of products that round to w_i; the scale is the float32 nearest
    the middle of the intersection, nudged by an ulp or two if the float32
    product rounds differently at an edge.
    """
    m = q - zero[:, None]  # [G, g] float64 integers
    dtype = w.dtype
    below = torch.nextafter(w, torch.full_like(w, -float("inf"))).double()
    above = torch.nextafter(w, torch.full_like(w, float("inf"))).double()
    x = w.double()
    a, b = (x + below) / 2, (x + above) / 2  # products that round to w lie in [a, b]
    live = m != 0
    safe = torch.where(live, m, torch.ones_like(m))
    lo = torch.where(m > 0, a / safe, b / safe)
    hi = torch.where(m > 0, b / safe, a / safe)
    lo = torch.where(live, lo, torch.full_like(lo, -float("inf"))).amax(1)  # [G]
    hi = torch.where(live, hi, torch.full_like(hi, float("inf"))).amin(1)
    mid = torch.where(torch.isfinite(lo) & torch.isfinite(hi), (lo + hi) / 2, torch.ones_like(lo))
    mid = torch.where(mid > 0, mid, torch.ones_like(mid))  # all codes at the zero point: any scale is exact
    scale = mid.float()
    qf, zf = q.float(), zero.float()[:, None]
    done = ((qf - zf) * scale[:, None]).to(dtype).eq(w).all(1)
    for step in (1, -1, 2, -2):
        if bool(done.all()):
            break
        cand = scale
        for _ in range(abs(step)):
            cand = torch.nextafter(cand, torch.full_like(cand, float("inf") if step > 0 else 0.0))
        ok = ((qf - zf) * cand[:, None]).to(dtype).eq(w).all(1) & ~done
        scale = torch.where(ok, cand, scale)
        done |= ok
    return scale


def _check_exact(qw: QuantizedWeight, w_hat: torch.Tensor, name: str, source: str) -> None:
    """Refuse codes that do not dequantize to the saved weight bit for bit, or that the format cannot store."""
    spec = qw.spec
    bad = (qw.dequantize(w_hat.dtype) != w_hat).reshape(qw.scale.numel(), -1).any(1)
    if bool(bad.any()):
        raise QigError(
            f"{name}: {int(bad.sum())} of {bad.numel()} groups do not dequantize exactly from {source} "
            f"({spec.label()}); export a folder written by 'qig quantize' with the setting in its search.json"
        )
    if int(qw.q.min()) < spec.qmin or int(qw.q.max()) > spec.qmax:
        raise QigError(f"{name}: codes outside {spec.qmin}..{spec.qmax} from {source} ({spec.label()})")


def check_storable(qw: QuantizedWeight, name: str) -> None:
    """Refuse zero points outside the code range: compressed-tensors stores them in b bits."""
    spec = qw.spec
    if spec.symmetric:
        return
    outside = (qw.zero < spec.qmin) | (qw.zero > spec.qmax)
    if bool(outside.any()):
        zmin, zmax = float(qw.zero.min()), float(qw.zero.max())
        raise QigError(
            f"{name}: {int(outside.sum())} groups have a zero point outside {spec.qmin}..{spec.qmax} "
            f"(from {zmin:g} to {zmax:g}): their weights all have one sign and qig's min-max quantizer does not "
            "clamp zero points, so compressed-tensors cannot store them; use --format fake-quant, or quantize "
            "with a larger group size"
        )
