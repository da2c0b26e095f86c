"""QIG: token weights from quantization-aware integrated gradients (METHOD.md section 5).

For the group's inspected block f and its quantized twin f_q (weights through
the production quantizer, unscaled; in W-A modes the group's linears also
quantize their inputs per token, with a straight-through gradient), the
attributed function is the quantization error
F(z) = sum over real tokens t of mean_h |f(z) - f_q(z)|_t.
Integrated gradients from a reference x' to the input x:

    IG = (x - x') * sum_k w_k dF/dz (x' + a_k (x - x'))      # quadrature (a_k, w_k) on [0, 1]

The K path points go through f and f_q in batches [P*b, T, C] of up to
PATH_TOKENS tokens (all K at once for a small chunk), one backward each, and
f_q's weights are quantized once per group. Per token,
q_t = mean_c |IG_tc|, normalised per sample, IQR-clipped over the sample's
real tokens and normalised again: lambda_t.

Cost choice: Gauss-Legendre with 2 nodes is the default. Against the
official 32-point Riemann rule on the same baseline (``benchmarks/quadrature.py``,
embedded model, 32 samples, every layer), Spearman of the token weights per
sample, mean / min: MLP input 0.9998 / 0.9990, MLP output 0.9993 / 0.9885,
attention input 0.9949 / 0.9659 -- below 0.97 at its worst sample; 3 nodes
there (``attention_steps=3``) give 0.9975 / 0.9790, 4 give 0.9992 / 0.9914.
The closer ranking did not make a better model: GPTQ with the QIG-weighted
Hessian kept more KL to FP with 3 attention nodes than with 2 (README,
``benchmarks/results/accuracy_w3_gptq_qig.txt``). Toy blocks: >= 0.99
(tests/methods/test_qig.py).

    >>> nodes, weights = quadrature("gauss-legendre", 4)
    >>> round(float(weights.sum()), 6)
    1.0
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from qig.dist import ordered
from qig.methods.base import (
    VISION_AND_ANSWER,
    GroupContext,
    Method,
    TokenWeights,
    counted_tokens,
    register,
    token_mask,
    uniform_weights,
)
from qig.methods.config import WEIGHT_ONLY_ABITS, SearchConfig
from qig.methods.search import SearchResult
from qig.options import option
from qig.quant.spec import compute_dtype, fake_quantize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QIGConfig(SearchConfig):
    """QIG: tokens weighted by quantization-aware integrated gradients (METHOD.md section 5).

    baseline: reference input x' = the quantized stream ("quantized", falls back
    to zero where it equals x), always zero ("zero"), or the quantized stream
    even where it equals x ("quantized-always", the official W-A code: there
    the path is empty, every weight is 0 and the group keeps s = 1, and a
    sample whose attribution is all zero weighs 0 instead of uniformly). clip:
    IQR clipping of the token scores ("iqr") or none. steps / quadrature: K
    points of Gauss-Legendre on [0, 1] or the official left-and-right Riemann
    grid linspace(0, 1, K) with weights 1/K; attention blocks take
    max(steps, attention_steps) points. uniform_first_groups: the first N group searches of a run use
    uniform weights over vision and answer tokens (the official code's counter
    artefact; 0 = off). tokens: which tokens QIG attributes and weights: every
    real token ("all", METHOD.md), or only vision and answer tokens
    ("vision+answer", MBQ's token set: prompt and template tokens weigh 0).
    fq_linears: which linears f_q quantizes: the group's ("group", METHOD.md) or
    every linear of the inspected block ("block": the official code, e.g. o_proj
    too when the group is q/k/v). fq_gradient: F is differentiated through f and
    f_q ("through", METHOD.md; W-A: straight through the activation quantizer)
    or through f only ("none": the official W-A code runs f_q without autograd).

    >>> QIGConfig(steps=8, quadrature="gauss-legendre").baseline
    'quantized'
    """

    name: ClassVar[str] = "qig"
    presets: ClassVar[tuple[str, ...]] = ("compat",)
    baseline: Literal["quantized", "zero", "quantized-always"] = option(
        "quantized", "QIG: reference input x' (x^q, or zero; quantized-always: x^q with no fallback, compat W-A)"
    )
    clip: Literal["iqr", "none"] = option("iqr", "QIG: token-score clipping")
    steps: int = option(2, "QIG: quadrature points (compat: 32)", min=1)
    attention_steps: int = option(
        2, "QIG: quadrature points of attention blocks, if more than steps (3: ranking as 32 Riemann points)", min=1
    )
    quadrature: Literal["gauss-legendre", "riemann"] = option("gauss-legendre", "QIG: path rule (compat: riemann)")
    uniform_first_groups: int = option(
        0, "QIG: the first N group searches weigh vision+answer tokens uniformly (the official code; compat: 5)", min=0
    )
    tokens: Literal["all", "vision+answer"] = option(
        "all",
        "QIG: tokens attributed and weighted (vision+answer won at W2 with text-token sinks, lost on a second "
        "calibration draw with vision-token sinks: docs/results.md, ranking)",
    )
    fq_linears: Literal["group", "block"] = option("group", "QIG: linears f_q quantizes (compat: block)")
    fq_gradient: Literal["through", "none"] = option(
        "through", "QIG: F's gradient through f_q too, or through f only (compat W-A: none)"
    )

    @classmethod
    def compat(cls, **overrides) -> QIGConfig:
        """The official QIG code's choices (x'=0, 32-point Riemann, ...; W-A: x'=x^q, no clipping, f(x^q)).

        Weight-only (abits 16): x' = 0 always, 32-point Riemann, MAE loss, the
        first five group searches with uniform weights over vision and answer
        tokens (each sample's summing to 1), f_q with every linear of the
        inspected block quantized, and pad positions counted as tokens (in F,
        the scores, the quartiles, the channel statistic and the loss). W-A
        (abits < 16, e.g. W4A8): the same, except x' = x^q (the quantized
        stream), no uniform phase (the official W-A search always attributes),
        IQR bounds not applied (clip "none"), F differentiated through f only,
        and the search scored against f(x^q) instead of f(x). ``overrides`` win
        over the preset. ``benchmarks/official_compare.py`` checks it against
        the official code group by group.

        >>> QIGConfig.compat(wbits=4, abits=8, group_size=None).reference_output
        'quantized'
        >>> QIGConfig.compat(wbits=3, clip="none").clip
        'none'
        """
        fields = dict(
            baseline="zero",
            clip="iqr",
            steps=32,
            quadrature="riemann",
            loss="mae",
            uniform_first_groups=5,
            fq_linears="block",
            pad_tokens="count",
        )
        if overrides.get("abits", WEIGHT_ONLY_ABITS) < WEIGHT_ONLY_ABITS:
            fields.update(
                baseline="quantized-always",
                clip="none",
                reference_output="quantized",
                uniform_first_groups=0,
                fq_gradient="none",
            )
        fields.update(overrides)
        return cls(**fields)


def quadrature(kind: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights on [0, 1], both [K] float64.

    "gauss-legendre": exact for polynomials of degree 2K-1. "riemann": the
    official code's linspace(0, 1, K) with weights 1/K.
    """
    if kind == "gauss-legendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)
    if kind == "riemann":
        return torch.linspace(0, 1, steps, dtype=torch.float64), torch.full((steps,), 1 / steps, dtype=torch.float64)
    raise ValueError(f"unknown quadrature {kind!r}; use gauss-legendre or riemann")


def quantization_error(y: torch.Tensor, y_q: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """F per path point: sum over real tokens of mean_h |y - y_q|. y: [K, b, T, H], real: [b, T] -> [K]."""
    per_token = (y.float() - y_q.float()).abs().mean(-1)  # [K, b, T]
    return (per_token * real.to(per_token.dtype)).sum(dim=(1, 2))


PATH_TOKENS = 4096  # tokens per pass of the path points through f and f_q (measured fastest on CPU, 2-5k)


def points_per_pass(tokens_per_point: int, steps: int) -> int:
    """How many of the K path points go through the block together: as many as fit in PATH_TOKENS, at least 1."""
    return max(1, min(steps, PATH_TOKENS // max(tokens_per_point, 1)))


def integrated_gradients(
    f: Callable[[torch.Tensor], torch.Tensor],
    f_q: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    x_ref: torch.Tensor,
    real: torch.Tensor,
    nodes: torch.Tensor,
    weights: torch.Tensor,
    per_pass: int | None = None,
) -> torch.Tensor:
    """IG of F(z) = sum_t mean_h |f(z) - f_q(z)|_t from x_ref to x: [b, T, C] (float32).

    f, f_q map [P*b, T, C] -> [P*b, T, H]. The K path points run as batches of
    ``per_pass`` (default: all K at once) with one backward each, in x's dtype;
    the path points are computed in float32 and rounded once, and the gradients
    are summed over the nodes in float32. In float16 the loss is multiplied by a
    power of two near H before the backward pass and the gradients divided by it
    in float32 (they would otherwise fall into float16's subnormals); a scaled
    backward that overflows is redone unscaled.
    """
    K = nodes.numel()
    per_pass = K if per_pass is None else per_pass
    wide = compute_dtype(x.dtype)
    delta = x.to(wide) - x_ref.to(wide)  # [b, T, C]
    summed = None
    for j in range(0, K, per_pass):
        part = _node_gradients(f, f_q, x, x_ref, delta, real, nodes[j : j + per_pass], weights[j : j + per_pass])
        summed = part if summed is None else summed + part
    return delta * summed


def _node_gradients(f, f_q, x, x_ref, delta, real, nodes, weights) -> torch.Tensor:
    """sum_k w_k dF/dz at the path points x_ref + a_k (x - x_ref) of ``nodes``, in one batch: [b, T, C] float32."""
    K, (b, T, C) = nodes.numel(), x.shape
    wide = delta.dtype
    a = nodes.to(device=x.device, dtype=wide).view(K, 1, 1, 1)
    with torch.enable_grad():
        z = (x_ref.to(wide).unsqueeze(0) + a * delta.unsqueeze(0)).to(x.dtype)
        z = z.reshape(K * b, T, C).requires_grad_(True)
        y, y_q = f(z), f_q(z)  # [K*b, T, H]
        F = quantization_error(y.view(K, b, T, -1), y_q.view(K, b, T, -1), real)  # [K]
        total = (F * weights.to(device=F.device, dtype=F.dtype)).sum()
        scale = _loss_scale(x.dtype, y.shape[-1])
        (grad,) = torch.autograd.grad(total * scale if scale != 1 else total, z, retain_graph=scale != 1)
        if scale != 1 and not bool(torch.isfinite(grad).all()):
            (grad,) = torch.autograd.grad(total, z)
            scale = 1.0
    summed = grad.view(K, b, T, C).to(wide).sum(0)  # sum_k w_k dF/dz_k, in float32
    return summed / scale if scale != 1 else summed


def _loss_scale(dtype: torch.dtype, width: int) -> float:
    """1, or in float16 the power of two nearest ``width`` (F's per-output gradient is 1/width)."""
    return float(2 ** round(math.log2(width))) if dtype == torch.float16 else 1.0


def token_scores(ig: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """q_t = mean_c |IG_tc|, zero on pad, normalised to sum 1 per sample: [b, T, C] -> [b, T]."""
    q = ig.float().abs().mean(-1) * real.float()  # [b, T]
    total = q.sum(-1, keepdim=True)
    return torch.where(total > 0, q / total.clamp(min=1e-30), torch.zeros_like(q))


def iqr_clip(q: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Clip each sample's scores to [Q1 - 1.5 IQR, Q3 + 1.5 IQR] of its real tokens: [b, T] -> [b, T]."""
    out = q.clone()
    for i in range(q.shape[0]):
        vals = q[i][real[i]]
        if vals.numel() == 0:
            continue
        q1, q3 = torch.quantile(vals, torch.tensor([0.25, 0.75], dtype=vals.dtype, device=vals.device))
        iqr = q3 - q1
        out[i] = q[i].clamp(min=float(q1 - 1.5 * iqr), max=float(q3 + 1.5 * iqr))
    return out * real.float()


def lambdas(ig: torch.Tensor, real: torch.Tensor, clip: str = "iqr", dead: str = "uniform") -> tuple[torch.Tensor, int]:
    """Token weights from IG: normalised, clipped, normalised again per sample.

    Returns ([b, T] weights summing to 1 per sample, number of samples whose
    attribution was all zero: they weigh uniformly, or 0 with ``dead="zero"``).
    """
    q = token_scores(ig, real)
    if clip == "iqr":
        q = iqr_clip(q, real)
    total = q.sum(-1, keepdim=True)  # [b, 1]
    if dead == "zero":
        fallback = torch.zeros_like(q)
    else:
        fallback = real.float() / real.float().sum(-1, keepdim=True).clamp(min=1)
    lam = torch.where(total > 0, q / total.clamp(min=1e-30), fallback)
    return lam, int((total <= 0).sum())


@register(QIGConfig)
class QIG(Method):
    needs_quantized_stream = True

    def __init__(self, config: QIGConfig) -> None:
        super().__init__(config)
        self.path = quadrature(config.quadrature, config.steps)  # (nodes, weights)
        self.attention_path = quadrature(config.quadrature, max(config.steps, config.attention_steps))

    def path_points(self) -> int:
        return max(self.config.steps, self.config.attention_steps)

    def _reference(self, ctx: GroupContext) -> str | None:
        """The reference input x' of this group: the configured one, or "zero" where x^q equals x (None: under
        quantized-always x' = x there, and every weight is 0)."""
        baseline = self.config.baseline
        empty = baseline != "zero" and (
            ctx.xq is None or all(torch.equal(a, b) for a, b in zip(ctx.x, ctx.xq, strict=True))
        )
        if not empty:
            return baseline
        if baseline == "quantized-always":
            log.info(
                "layer %d %s: x^q equals x here; every weight is 0 (quantized-always)", ctx.layer_index, ctx.group.name
            )
            return None
        log.info(
            "layer %d %s: the quantized stream equals the FP stream here; QIG uses x' = 0",
            ctx.layer_index,
            ctx.group.name,
        )
        return "zero"

    def token_weights(self, ctx: GroupContext) -> TokenWeights:
        cfg: QIGConfig = self.config
        if ctx.search_index < cfg.uniform_first_groups:
            # The official code's counter artefact, reproduced only under the compat preset: each sample sums to 1.
            w = [uniform_weights(r, VISION_AND_ANSWER) for r in ctx.roles]
            w = [x / x.sum(-1, keepdim=True).clamp(min=1) for x in w]
            return TokenWeights(w, {"baseline": "none (uniform vision+answer, compat)", "uniform_fallback": 0})
        fq = ctx.linears if cfg.fq_linears == "group" or ctx.block_linears is None else ctx.block_linears
        quantized = {k: fake_quantize(lin.weight.data, ctx.spec) for k, lin in fq.items()}
        baseline = self._reference(ctx)
        if baseline is None:  # x' = x: IG is exactly 0, so is every weight
            zeros = [torch.zeros_like(r, dtype=torch.float32) for r in ctx.roles]
            return TokenWeights(zeros, {"baseline": cfg.baseline})
        nodes, node_weights = self.attention_path if ctx.group.block_takes_layer_kwargs else self.path
        dead_weigh = "zero" if cfg.baseline == "quantized-always" else "uniform"  # samples of zero attribution
        out, dead = [], 0
        for i, (x, roles) in enumerate(zip(ctx.x, ctx.roles, strict=True)):
            x_ref = torch.zeros_like(x) if baseline == "zero" else ctx.xq[i]
            if cfg.tokens == "vision+answer":
                real = token_mask(roles, VISION_AND_ANSWER)
            else:
                real = counted_tokens(roles, cfg.pad_tokens)

            def f_q(z, i=i):
                with torch.no_grad() if cfg.fq_gradient == "none" else contextlib.nullcontext():
                    return ctx.run_quantized(z, i, quantized, fq)

            ig = integrated_gradients(
                lambda z, i=i: ctx.run_block(z, i, None),
                f_q,
                x,
                x_ref,
                real,
                nodes,
                node_weights,
                points_per_pass(x.shape[0] * x.shape[1], nodes.numel()),
            )  # [b, T, C]
            lam, n_dead = lambdas(ig, real, cfg.clip, dead_weigh)
            out.append(lam)
            dead += n_dead
        if dead:
            log.warning(
                "layer %d %s: %d sample(s) had zero attribution; %s",
                ctx.layer_index,
                ctx.group.name,
                dead,
                "they weigh 0" if dead_weigh == "zero" else "uniform weights used",
            )
        return TokenWeights(out, {"baseline": baseline, "uniform_fallback": dead})

    def scales(self, ctx: GroupContext, weights: list[torch.Tensor]) -> SearchResult | None:
        """None (the shared search), or s = 1 where every weight is 0 under "quantized-always" (the official code).

        There the official loss is 0 / eps = 0 for every candidate and its first-wins rule keeps r = 0.
        """
        if self.config.baseline != "quantized-always" or sum(ordered([float(w.sum()) for w in weights])) > 0:
            return None
        s = torch.ones(ctx.x[0].shape[-1], dtype=torch.float32, device=ctx.x[0].device)
        n = self.config.n_grid
        return SearchResult(scales=s, ratio=0.0, loss_before=0.0, loss_after=0.0, losses=[0.0] * n)
