"""The channel-scale search shared by AWQ, MBQ and QIG (METHOD.md section 4).

Written once; methods differ only in the token weights they pass in.
Weight-only candidates are ``f_{Q(W*s)/s}(X)`` on the FP stream; W-A
candidates are ``f_{Q(W*s)}(Q_a(X/s))`` on the quantized stream x^q, both
scored against the FP block's output on the FP input, f(x).

A bf16 / fp16 model is searched in its dtype: the blocks run in it, the
channel statistic is a float32 mean, the per-token errors float32 and the
loss sums float64; a candidate's ``W * s`` is rounded to the weight's dtype as
its fold would leave it. A candidate whose loss overflows (NaN or inf) is
never chosen.

    >>> result = search_scales(ctx, weights, n_grid=20, loss="mae")  # doctest: +SKIP
    >>> result.scales.shape  # doctest: +SKIP
    torch.Size([256])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from qig.dist import current, ordered
from qig.errors import QigError
from qig.methods.base import GroupContext, counted_tokens
from qig.quant.fold import scaled_fake_quantize
from qig.quant.spec import QuantSpec, fake_quantize

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """The chosen scale [C], its grid ratio, and the weighted loss of every candidate."""

    scales: torch.Tensor
    ratio: float
    loss_before: float  # candidate r = 0 (s = 1): plain quantization
    loss_after: float
    losses: list[float] = field(default_factory=list)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)  # linear key -> clip ratios [out, n_groups]


def channel_means(xs: list[torch.Tensor], roles: list[torch.Tensor], pad_tokens: str = "skip") -> torch.Tensor:
    """m_c = mean over real tokens (pads too: "count") of |X_tc|, over all chunks (every rank's, in order): [C]."""
    parts = []
    for x, r in zip(xs, roles, strict=True):
        real = counted_tokens(r, pad_tokens)  # [b, T]
        parts.append((x.float().abs()[real].sum(0), int(real.sum())))  # [C], count
    total, count = None, 0
    for part, n in ordered_on(parts, xs[0].device):
        total = part if total is None else total + part
        count += n
    if count == 0:
        raise QigError("the calibration chunks hold no real tokens")
    return total / count


def ordered_on(parts: list, device: torch.device) -> list:
    """``qig.dist.ordered`` for (tensor, count) pairs: tensors travel on the CPU, come back to ``device``."""
    if current().size == 1:
        return parts
    return [(t.to(device), n) for t, n in ordered([(t.cpu(), n) for t, n in parts])]


def candidate_scales(
    m: torch.Tensor, n_grid: int, w_mean: torch.Tensor | None = None
) -> Iterator[tuple[float, torch.Tensor]]:
    """(r, s) for r in {0, 1/n, ..., (n-1)/n}: s = max(m^r, 1e-4) / sqrt(max(s) min(s)).

    With ``w_mean`` [C] (duo scaling, llm-compressor's AWQ default) ``s = max(m^r / (w^(1-r) + 1e-4), 1e-4)``
    for r > 0; r = 0 stays s = 1, as llm-compressor keeps the identity in its grid.

    >>> [r for r, _ in candidate_scales(torch.ones(4), 4, w_mean=torch.ones(4))]
    [0.0, 0.25, 0.5, 0.75]
    """
    for i in range(n_grid):
        r = i / n_grid
        if w_mean is None or i == 0:
            s = m.pow(r).clamp(min=1e-4)
        else:
            s = (m.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        yield r, s


def weight_means(linears: Iterable[torch.nn.Linear], spec: QuantSpec) -> torch.Tensor:
    """Duo scaling's w [C]: per input channel, the mean of |W| normalised by its quantization group's max|W|.

    Every row of every linear of the group counts once (llm-compressor's definition: each
    group of ``group_size`` inputs of a row, or the whole row per channel, divided by its
    largest magnitude + 1e-6, then averaged over all rows).

    >>> weight_means([torch.nn.Linear(4, 2)], QuantSpec(bits=4, group_size=None)).shape
    torch.Size([4])
    """
    total, rows = None, 0
    for lin in linears:
        w = lin.weight.detach().float().abs()  # [out, C]
        g = spec.group_size or w.shape[1]
        wg = w.reshape(w.shape[0], -1, g)  # [out, G, g]
        wg = wg / (wg.amax(-1, keepdim=True) + 1e-6)
        part = wg.reshape(w.shape).double().sum(0)  # [C]
        total = part if total is None else total + part
        rows += w.shape[0]
    return (total / rows).float()


def token_errors(y_ref: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-token error over output channels: [b, T, H] x2 -> [b, T] float32."""
    d = y_ref.float() - y.float()
    return d.abs().mean(-1) if loss == "mae" else d.square().mean(-1)


def reference_outputs(ctx: GroupContext, reference: str = "fp") -> Sequence[torch.Tensor]:
    """What candidates are scored against: the FP block on x ("fp"), or on the search inputs ("quantized")."""
    inputs = ctx.x if reference == "fp" else ctx.search_inputs
    return ctx.keep(ctx.run_block(x, i, None) for i, x in enumerate(inputs))  # per chunk [b, T, H]


@torch.no_grad()
def score_scales(
    ctx: GroupContext,
    weights: list[torch.Tensor],
    y_ref: list[torch.Tensor],
    candidates: list[torch.Tensor],
    loss: str = "mae",
) -> list[float]:
    """The loss sum_t w_t e_t(s) / sum_t w_t of each candidate scale [C], over all chunks."""
    den = sum(ordered([float(w.double().sum()) for w in weights]))  # every rank's chunks, in chunk order
    if not den > 0:
        raise QigError(
            f"layer {ctx.layer_index} group {ctx.group.name}: every token weight is zero; the calibration set "
            "needs tokens of the roles the method weights (e.g. answer tokens for MBQ)"
        )
    nums = []  # per candidate, per chunk
    for s in candidates:
        if ctx.act_spec is None:  # weight-only: f_{Q(W s)/s}(X)
            overrides = {k: scaled_fake_quantize(lin.weight, s, ctx.spec) for k, lin in ctx.linears.items()}
        else:  # W-A: f_{Q(W s)}(Q_a(X / s)), W s rounded to the weight's dtype as the fold leaves it
            overrides = {
                k: fake_quantize((lin.weight.float() * s.view(1, -1)).to(lin.weight.dtype), ctx.spec)
                for k, lin in ctx.linears.items()
            }
        per_chunk = []
        for i, x in enumerate(ctx.search_inputs):
            if ctx.act_spec is None:
                y = ctx.run_block(x, i, overrides)
            else:  # x / s in float32, rounded once to x's dtype
                y = ctx.run_quantized((x.float() / s.to(x.device)).to(x.dtype), i, overrides)
            e = token_errors(y_ref[i], y, loss)  # [b, T]
            per_chunk.append(float((e.double() * weights[i].to(e.device).double()).sum()))
        nums.append(per_chunk)
    losses = []
    for per_chunk in zip(*ordered(list(zip(*nums, strict=True))), strict=True):  # every rank's chunks, in order
        num = 0.0
        for v in per_chunk:
            num += v
        losses.append(num / den)
    return losses


@torch.no_grad()
def search_scales(
    ctx: GroupContext,
    weights: list[torch.Tensor],
    n_grid: int = 20,
    loss: str = "mae",
    reference: str = "fp",
    pad_tokens: str = "skip",
    duo_scaling: bool = False,
) -> SearchResult:
    """Pick the candidate scale minimising sum_t w_t e_t(s) / sum_t w_t over all chunks.

    weights: per chunk [b, T] (0 on pad tokens, unless the method counts them). Ties go to the smaller r.
    reference / pad_tokens: see ``SearchConfig.reference_output`` (W-A modes only) and ``pad_tokens``.
    duo_scaling: candidates ``m^r / w^(1-r)`` (:func:`candidate_scales`, :func:`weight_means`).
    """
    y_ref = reference_outputs(ctx, reference)
    m = channel_means(ctx.search_inputs, ctx.roles, pad_tokens)
    w_mean = weight_means(ctx.linears.values(), ctx.spec).to(m.device) if duo_scaling else None
    grid = list(candidate_scales(m, n_grid, w_mean))
    losses = score_scales(ctx, weights, y_ref, [s for _, s in grid], loss)
    finite = [math.isfinite(v) for v in losses]
    if not all(finite):
        log.warning(
            "layer %d %s: %d of %d candidate scales overflow %s (loss NaN or inf); they are not chosen",
            ctx.layer_index,
            ctx.group.name,
            finite.count(False),
            len(grid),
            ctx.x[0].dtype,
        )
    best = min(range(len(grid)), key=lambda j: (losses[j] if finite[j] else math.inf, j))  # ties: the smaller r
    r, s = grid[best]
    return SearchResult(scales=s, ratio=r, loss_before=losses[0], loss_after=losses[best], losses=losses)
