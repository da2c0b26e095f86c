"""SmoothQuant: a closed-form channel scale per group, folded, then RTN W-A (METHOD.md section 6).

    s_c = max_t |X_tc|^alpha / max_o |W_oc|^(1 - alpha)

X is the group's input on the quantized stream x^q (the stream every W-A
method uses here; the paper takes its statistics from the FP model in one
pass), over real tokens; W stacks the group's linears. Every scale group of
the family is smoothed (norm -> linears and linear -> linear alike), folded
like a searched scale. The loss of s = 1 and of the chosen s is reported with
uniform token weights, as AWQ would score them; it does not choose anything.

    >>> from qig.methods import method_for, SmoothQuantConfig
    >>> method_for(SmoothQuantConfig(wbits=8, abits=8, group_size=None)).finds_scales
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from qig.errors import QigError
from qig.methods.base import GroupContext, Method, TokenWeights, real_tokens, register, uniform_weights
from qig.methods.config import WEIGHT_ONLY_ABITS, QuantConfig
from qig.methods.search import SearchResult, ordered_on, reference_outputs, score_scales
from qig.options import option

EPS = 1e-5


@dataclass(frozen=True)
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant (METHOD.md section 6), weight-activation modes only.

    Per scale group, ``s_c = max_t |X_tc|^alpha / max_o |W_oc|^(1 - alpha)``
    (X: the group's input on the quantized stream; W: its linears stacked),
    folded like a searched scale; then RTN W-A. No search, no gradients.

    >>> SmoothQuantConfig(wbits=8, abits=8, group_size=None).alpha
    0.5
    """

    name: ClassVar[str] = "smoothquant"
    alpha: float = option(0.5, "SmoothQuant: migration strength", min=0.0, max=1.0, hint="0.5 is SmoothQuant's default")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.abits == WEIGHT_ONLY_ABITS:
            raise QigError(
                "smoothquant moves activation outliers into the weights for activation quantization; "
                "give it abits below 16 (e.g. abits=8 with group_size=None; CLI: --abits 8)"
            )


def channel_max(xs: list[torch.Tensor], roles: list[torch.Tensor]) -> torch.Tensor:
    """max over real tokens of |X_tc|, over all chunks (of every rank): [C] float32."""
    parts = [(x.float().abs()[real_tokens(r)].amax(0), 0) for x, r in zip(xs, roles, strict=True)]  # [C]
    out = None
    for part, _ in ordered_on(parts, xs[0].device):
        out = part if out is None else torch.maximum(out, part)
    assert out is not None
    return out


def smoothing_scales(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s [C] from the activations' channel max [C] and the group's weights [out_i, C]."""
    w_max = torch.cat([w.float().abs() for w in weights], dim=0).amax(0).to(x_max.device)  # [C]
    s = x_max.clamp(min=EPS).pow(alpha) / w_max.clamp(min=EPS).pow(1 - alpha)
    return s.clamp(min=EPS)


@register(SmoothQuantConfig)
class SmoothQuant(Method):
    def token_weights(self, ctx: GroupContext) -> TokenWeights:
        return TokenWeights([uniform_weights(r) for r in ctx.roles], {"alpha": self.config.alpha})

    @torch.no_grad()
    def scales(self, ctx: GroupContext, weights: list[torch.Tensor]) -> SearchResult:
        alpha = self.config.alpha
        x_max = channel_max(ctx.search_inputs, ctx.roles)
        s = smoothing_scales(x_max, [lin.weight for lin in ctx.linears.values()], alpha)
        before, after = score_scales(ctx, weights, reference_outputs(ctx), [torch.ones_like(s), s])
        return SearchResult(scales=s, ratio=alpha, loss_before=before, loss_after=after, losses=[before, after])
