"""GPTQ (arXiv 2210.17323) of one linear, with the shared group quantizer (METHOD.md section 7).

GPTQ quantizes the columns of W [out, C] one at a time and spreads each
column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian of the layer's squared output error,

    H = 2 X^T diag(w) X / sum_t w_t          # X: [tokens, C], w: token weights (1 = plain GPTQ)

so the result minimises sum_t w_t ||W x_t - W_hat x_t||^2 rather than the
plain sum (QIG's "GPTQ with a weighted Hessian", METHOD.md section 5).

The quantizer is ``qig.quant.spec``'s, so the result is exactly what the
export packs: each group's scale and zero point are the asymmetric min-max of
that group's (already error-updated) weights, computed when GPTQ reaches the
group's first column, as the reference implementation does; every value goes
through ``qig.quant.spec.encode`` and ``decode``. With ``act_order`` the columns are
processed in order of decreasing Hessian diagonal and groups are formed in
that order, so the result carries a group index per input column (``g_idx``,
the compressed-tensors "actorder: group" notion).

Whatever the weight's dtype (bf16, fp16), H, its Cholesky factor and the
updated weights are float32; each quantized column is rounded to the weight's
dtype as it will be stored, and that error is the one spread onward.

    >>> import torch
    >>> from qig.quant import QuantSpec
    >>> from qig.quant.gptq import GPTQSettings, Hessian, gptq_quantize
    >>> x = torch.randn(512, 256)
    >>> h = Hessian(256)
    >>> h.add(x)
    >>> result = gptq_quantize(torch.randn(8, 256), h, QuantSpec(bits=3, group_size=128), GPTQSettings())
    >>> result.scale.shape
    torch.Size([8, 2])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from qig.errors import QigError
from qig.quant.spec import QuantSpec, decode, encode, global_scale, quant_params


@dataclass(frozen=True)
class GPTQSettings:
    """How GPTQ runs (the quantizer itself is the ``QuantSpec``).

    block_size: columns per lazy batch update (128 as the paper); it and the
    group size must divide one another. damp: added to H's diagonal, relative
    to its mean (0.01). act_order: process columns by decreasing H diagonal;
    with groups the result keeps a group index per column (``g_idx``).

    >>> GPTQSettings(damp=0.1).block_size
    128
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size <= 0:
            raise QigError(f"GPTQ block_size must be a positive integer such as 128, got {self.block_size!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not 0 < self.damp < 1:
            raise QigError(f"GPTQ damp must be a number in (0, 1), such as 0.01, got {self.damp!r}")
        if not isinstance(self.act_order, bool):
            raise QigError(f"GPTQ act_order must be true or false, got {self.act_order!r}")

    def check(self, spec: QuantSpec) -> None:
        """Refuse a block size that neither divides nor is divided by the group size."""
        g, b = spec.group_size, self.block_size
        if g is not None and b % g != 0 and g % b != 0:
            raise QigError(
                f"GPTQ block_size {b} and group_size {g} must divide one another "
                f"(a group must start where its columns are up to date); use block_size {max(g, 128)}"
            )


@dataclass
class HessianPart:
    """One batch's share of a Hessian: A = sum_t w_t x_t x_t^T [C, C] float32 (None if m = 0), m = sum_t w_t.

    live: [C] channels nonzero on a real token; tokens: real tokens.
    """

    A: torch.Tensor | None
    m: float
    live: torch.Tensor
    tokens: int


class Hessian:
    """Running ``H = 2 X^T diag(w) X / sum_t w_t`` over token batches, in float32.

    ``add`` takes activations [..., C] and token weights [...] (pad tokens
    must weigh 0; None = weight 1 on every token) and keeps a running mean,
    so memory is one [C, C] matrix whatever the number of tokens. It also
    counts, per channel, whether any real token (weight or not) was nonzero:
    a channel dead on every real token is zeroed by GPTQ, one dead only on
    the weighted tokens is kept (quantized without error feedback).
    """

    def __init__(self, n_features: int, device: str | torch.device = "cpu") -> None:
        self.H = torch.zeros(n_features, n_features, dtype=torch.float32, device=device)
        self.weight_sum = 0.0  # running sum_t w_t (the count, for uniform weights)
        self.tokens = 0  # real tokens seen
        self.live = torch.zeros(n_features, dtype=torch.bool, device=device)

    @torch.no_grad()
    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None, real: torch.Tensor | None = None) -> None:
        """Accumulate tokens ``x`` [..., C] with ``weights`` [...] (>= 0); ``real`` [...] marks non-pad tokens.

        Without ``real``, tokens with a positive weight are the real ones.
        """
        self.accumulate(self.part(x, weights, real))

    @torch.no_grad()
    def part(
        self, x: torch.Tensor, weights: torch.Tensor | None = None, real: torch.Tensor | None = None
    ) -> HessianPart:
        """One batch's share of H, computed apart from the running mean (any process can compute it)."""
        C = self.H.shape[0]
        x = x.reshape(-1, C).to(self.H.device, torch.float32)  # [n, C]
        w = torch.ones(x.shape[0], device=x.device) if weights is None else weights.reshape(-1).to(x.device).float()
        if w.shape[0] != x.shape[0]:
            raise QigError(f"token weights for {w.shape[0]} tokens given with activations of {x.shape[0]} tokens")
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise QigError("token weights must be finite and >= 0")
        r = (w > 0) if real is None else real.reshape(-1).to(x.device).bool()
        live = x[r].ne(0).any(0) if r.any() else torch.zeros(C, dtype=torch.bool, device=x.device)
        keep = w > 0
        x, w = x[keep], w[keep]  # [m, C], [m]
        m = float(w.double().sum())
        if m == 0.0:
            return HessianPart(None, 0.0, live, int(r.sum()))
        xs = x * w.sqrt().unsqueeze(1)  # sqrt(w_t) x_t
        return HessianPart(xs.t() @ xs, m, live, int(r.sum()))

    @torch.no_grad()
    def accumulate(self, p: HessianPart) -> None:
        """H <- (W H + 2 A) / (W + m): the running mean, one part at a time (in the order of the batches)."""
        self.live |= p.live
        self.tokens += p.tokens
        if p.m == 0.0:
            return
        total = self.weight_sum + p.m
        self.H.mul_(self.weight_sum / total).add_(p.A, alpha=2.0 / total)
        self.weight_sum = total

    def finish(self) -> torch.Tensor:
        """H [C, C] (a copy); refuses an empty accumulator."""
        if self.weight_sum == 0.0:
            raise QigError("the Hessian saw no token with a positive weight; the calibration set has no real tokens")
        return self.H.clone()


@dataclass
class GPTQResult:
    """A GPTQ-quantized weight and the quantizer parameters that reproduce it exactly.

    weight: [out, C] fake-quantized, in the input weight's dtype. scale, zero:
    [out, n_groups] float32 (group j = the j-th group GPTQ formed). g_idx: [C]
    int32 group of each input column, or None when column c is in group
    c // group_size (no act-order, or per-channel). error: the objective
    trace((W - W_hat) H (W - W_hat)^T) / out (for logs). dead: input channels
    whose Hessian diagonal was zero. global_scale: NVFP4's per-tensor scale [1]
    (None for other numbers).
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor | None
    error: float
    dead: int
    global_scale: torch.Tensor | None = None


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: Hessian | torch.Tensor,
    spec: QuantSpec,
    settings: GPTQSettings | None = None,
) -> GPTQResult:
    """Quantize ``weight`` [out, C] with GPTQ for the Hessian ``hessian`` [C, C]; the weight is not modified.

    A zero diagonal entry (a dead input channel) is set to 1 so the Cholesky
    factorisation exists; when the channel is dead on every real token its
    weight column is zeroed first, as the reference GPTQ does.
    """
    settings = settings or GPTQSettings()
    out_f, C = weight.shape
    spec.check(C, "the GPTQ weight")
    settings.check(spec)
    if isinstance(hessian, Hessian):
        H, live = hessian.finish().to(weight.device), hessian.live.to(weight.device)
    else:
        H, live = hessian.to(weight.device, torch.float32).clone(), None
    if H.shape != (C, C):
        raise QigError(f"Hessian of shape {tuple(H.shape)} does not match a weight with {C} input channels")
    W = weight.detach().float().clone()  # [out, C]

    dead = torch.diag(H) == 0  # [C]
    H[dead, dead] = 1.0
    zero_cols = dead if live is None else dead & ~live
    W[:, zero_cols] = 0.0

    perm = None
    if settings.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)  # [C]
        W, H = W[:, perm], H[perm][:, perm]
    H_orig = H.clone()

    idx = torch.arange(C, device=H.device)
    H[idx, idx] += settings.damp * torch.mean(torch.diag(H))
    Hinv = _upper_cholesky_of_inverse(H)  # [C, C], upper triangular

    g = spec.group_size or C
    group_spec = dataclasses.replace(spec, group_size=g)
    tensor_scale = global_scale(W, spec)  # NVFP4: one per weight, from the weight before any update
    Q = torch.zeros_like(W)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    scale = zero = None
    B = settings.block_size
    for i1 in range(0, C, B):
        i2 = min(i1 + B, C)
        W1 = W[:, i1:i2].clone()  # [out, b]: the block, updated as its columns are quantized
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                # The group's weights as they are now: within the block from W1 (up to date),
                # past it from W (up to date at a block start; block and group sizes divide).
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]  # [out, g]
                s, z = quant_params(current, group_spec, tensor_scale)  # [out, 1] each
                scale, zero = s[:, 0], z[:, 0]
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]  # [out]
            # The shared rounding, dequantized and rounded to the weight's dtype as it will be stored:
            # the error fed forward is the stored weight's (a bf16 / fp16 weight's rounding included).
            q = decode(encode(w, scale, zero, spec), scale, zero).to(weight.dtype).float()
            Q[:, col] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    D = _residual(Q, weight, zero_cols, perm)  # [out, C]
    error = float(torch.einsum("oi,ij,oj->", D, H_orig, D)) / out_f

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if spec.group_size is not None:
            g_idx = (torch.arange(C, device=Q.device) // g)[inv].to(torch.int32)  # group of each original column
    return GPTQResult(
        weight=Q.to(weight.dtype),
        scale=torch.stack(scales, dim=1),  # [out, n_groups]
        zero=torch.stack(zeros, dim=1),
        g_idx=g_idx,
        error=error,
        dead=int(dead.sum()),
        global_scale=tensor_scale,
    )


def _residual(Q: torch.Tensor, weight: torch.Tensor, zero_cols: torch.Tensor, perm: torch.Tensor | None):
    """W - Q in GPTQ's (permuted) column order, W with dead columns zeroed: [out, C]."""
    W = weight.detach().float().clone()
    W[:, zero_cols] = 0.0
    if perm is not None:
        W = W[:, perm]
    return W - Q


def _upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, raising the damping if H is numerically not positive definite."""
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    extra = 0.0
    mean_diag = float(torch.mean(torch.diag(H)))
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + extra * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        extra = mean_diag * (0.01 if extra == 0.0 else 10 * extra / mean_diag)
    raise QigError(
        "the GPTQ Hessian is not positive definite even with extra damping; raise damp (e.g. 0.1) "
        "or use more calibration samples"
    )


def normalize_token_weights(weights: list[torch.Tensor], top: float | None = None) -> list[torch.Tensor]:
    """Token weights divided by their largest value over all chunks (so equal weights become exactly 1).

    H is invariant to a common scale of the weights; this makes it exact too:
    a constant weight gives bit-for-bit the plain (unweighted) Hessian.
    top: the largest value, when it is taken over more chunks than ``weights`` (every rank's).
    """
    if top is None:
        top = max(float(w.max()) for w in weights) if weights else 0.0
    if not top > 0:
        raise QigError("every token weight is zero; the weighted Hessian needs tokens with a positive weight")
    return [w.float() / top for w in weights]
