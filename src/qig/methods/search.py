"""The channel-scale search shared by AWQ, MBQ and QIG (METHOD.md section 4).

Written once; methods differ only in the token weights they pass in.
Weight-only candidates are ``f_{Q(W*s)/s}(X)`` on the FP stream; W-A
candidates are ``f_{Q(W*s)}(Q_a(X/s))`` on the quantized stream x^q, both
scored against the FP block's output on the FP input, f(x).

    >>> result = search_scales(ctx, weights, n_grid=20, loss="mae")  # doctest: +SKIP
    >>> result.scales.shape  # doctest: +SKIP
    torch.Size([256])
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from qig.errors import QigError
from qig.methods.base import GroupContext, real_tokens
from qig.quant.fold import scaled_fake_quantize
from qig.quant.spec import fake_quantize


@dataclass
class SearchResult:
    """The chosen scale [C], its grid ratio, and the weighted loss of every candidate."""

    scales: torch.Tensor
    ratio: float
    loss_before: float  # candidate r = 0 (s = 1): plain quantization
    loss_after: float
    losses: list[float] = field(default_factory=list)


def channel_means(xs: list[torch.Tensor], roles: list[torch.Tensor]) -> torch.Tensor:
    """m_c = mean over real tokens of |X_tc|, over all chunks: [C] float32."""
    total, count = None, 0
    for x, r in zip(xs, roles, strict=True):
        real = real_tokens(r)  # [b, T]
        part = x.float().abs()[real].sum(0)  # [C]
        total = part if total is None else total + part
        count += int(real.sum())
    if count == 0:
        raise QigError("the calibration chunks hold no real tokens")
    return total / count


def candidate_scales(m: torch.Tensor, n_grid: int) -> Iterator[tuple[float, torch.Tensor]]:
    """(r, s) for r in {0, 1/n, ..., (n-1)/n}: s = max(m^r, 1e-4) / sqrt(max(s) min(s))."""
    for i in range(n_grid):
        r = i / n_grid
        s = m.pow(r).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        yield r, s


def token_errors(y_ref: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-token error over output channels: [b, T, H] x2 -> [b, T] float32."""
    d = y_ref.float() - y.float()
    return d.abs().mean(-1) if loss == "mae" else d.square().mean(-1)


def reference_outputs(ctx: GroupContext, reference: str = "fp") -> list[torch.Tensor]:
    """What candidates are scored against: the FP block on x ("fp"), or on the search inputs ("quantized")."""
    inputs = ctx.x if reference == "fp" else ctx.search_inputs
    return [ctx.run_block(x, i, None) for i, x in enumerate(inputs)]  # per chunk [b, T, H]


@torch.no_grad()
def score_scales(
    ctx: GroupContext,
    weights: list[torch.Tensor],
    y_ref: list[torch.Tensor],
    candidates: list[torch.Tensor],
    loss: str = "mae",
) -> list[float]:
    """The loss sum_t w_t e_t(s) / sum_t w_t of each candidate scale [C], over all chunks."""
    den = sum(float(w.double().sum()) for w in weights)
    if not den > 0:
        raise QigError(
            f"layer {ctx.layer_index} group {ctx.group.name}: every token weight is zero; the calibration set "
            "needs tokens of the roles the method weights (e.g. answer tokens for MBQ)"
        )
    losses = []
    for s in candidates:
        if ctx.act_spec is None:  # weight-only: f_{Q(W s)/s}(X)
            overrides = {k: scaled_fake_quantize(lin.weight, s, ctx.spec) for k, lin in ctx.linears.items()}
        else:  # W-A: f_{Q(W s)}(Q_a(X / s))
            overrides = {
                k: fake_quantize(lin.weight.float() * s.view(1, -1), ctx.spec).to(lin.weight.dtype)
                for k, lin in ctx.linears.items()
            }
        num = 0.0
        for i, x in enumerate(ctx.search_inputs):
            if ctx.act_spec is None:
                y = ctx.run_block(x, i, overrides)
            else:
                y = ctx.run_quantized(x / s.to(x), i, overrides)
            e = token_errors(y_ref[i], y, loss)  # [b, T]
            num += float((e.double() * weights[i].to(e.device).double()).sum())
        losses.append(num / den)
    return losses


@torch.no_grad()
def search_scales(
    ctx: GroupContext, weights: list[torch.Tensor], n_grid: int = 20, loss: str = "mae", reference: str = "fp"
) -> SearchResult:
    """Pick the candidate scale minimising sum_t w_t e_t(s) / sum_t w_t over all chunks.

    weights: per chunk [b, T] (pad tokens must be 0). Ties go to the smaller r.
    reference: see ``SearchConfig.reference_output`` (W-A modes only).
    """
    y_ref = reference_outputs(ctx, reference)
    m = channel_means(ctx.search_inputs, ctx.roles)
    grid = list(candidate_scales(m, n_grid))
    losses = score_scales(ctx, weights, y_ref, [s for _, s in grid], loss)
    best = min(range(len(grid)), key=lambda j: (losses[j], j))  # ties: the smaller r
    r, s = grid[best]
    return SearchResult(scales=s, ratio=r, loss_before=losses[0], loss_after=losses[best], losses=losses)
