"""MBQ: answer tokens weigh 1, vision tokens rho_l, everything else 0 (METHOD.md section 4).

rho_l comes from one gradient pre-pass, run by the pipeline before the layer
loop (``needs_answer_gradients``; ``qig.pipeline.gradients``, one decoder layer
at a time): the SFT loss on answer tokens is back-propagated through the FP
model, batch by batch, and hooks on each sub-layer's output linear (o_proj for
attention, down_proj for the MLP) accumulate the mean |dL/dy| over vision tokens
and over answer tokens. :meth:`MBQ.use_answer_gradients` turns these sums into rho.

    rho_l = max(gbar_vis,l / gbar_ans,l, median over layers of that ratio)

(the contract's formula, applied separately to attention and MLP sub-layers;
the ratio is floored at its median so no layer silences its vision tokens).

    >>> from qig.methods import method_for, MBQConfig
    >>> m = method_for(MBQConfig(wbits=3))
    >>> m.finds_scales, m.needs_answer_gradients, m.answer_gradient_batch_size
    (True, True, 4)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from qig.calib import ANSWER, VISION
from qig.errors import QigError
from qig.methods.base import GroupContext, Method, TokenWeights, register
from qig.methods.config import SearchConfig
from qig.options import option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MBQConfig(SearchConfig):
    """MBQ: answer tokens weigh 1, vision tokens rho_l (gradient ratio), the rest 0.

    grad_batch_size: samples per backward pass of the gradient pre-pass.

    >>> MBQConfig(wbits=3).grad_batch_size
    4
    """

    name: ClassVar[str] = "mbq"
    grad_batch_size: int = option(4, "MBQ: samples per backward of the gradient pre-pass", min=1)


@register(MBQConfig)
class MBQ(Method):
    needs_answer_gradients = True

    def __init__(self, config: MBQConfig) -> None:
        super().__init__(config)
        self.answer_gradient_batch_size = config.grad_batch_size
        self.rho: dict[str, list[float]] = {}  # sub-layer output path -> rho per layer
        self.ratios: dict[str, list[float]] = {}

    def use_answer_gradients(self, sums: dict[str, list[dict]]) -> None:
        """rho per sub-layer output and layer: the vision / answer gradient ratio, floored at its median.

        >>> from qig.methods import method_for
        >>> m = method_for(MBQConfig(wbits=3))
        >>> m.use_answer_gradients({"mlp.down_proj": [dict(vis=v, n_vis=2, ans=1.0, n_ans=1) for v in (0.5, 1.0, 3.0)]})
        >>> m.ratios["mlp.down_proj"], m.rho["mlp.down_proj"]
        ([0.25, 0.5, 1.5], [0.5, 0.5, 1.5])
        """
        for path, per_layer in sums.items():
            ratios = []
            for layer_index, s in enumerate(per_layer):
                if s["n_ans"] == 0:
                    raise QigError("MBQ needs answer tokens in the calibration set (assistant replies); found none")
                g_vis = s["vis"] / s["n_vis"] if s["n_vis"] else 0.0
                g_ans = s["ans"] / s["n_ans"]
                if g_ans == 0.0:
                    raise QigError(f"MBQ: zero answer-token gradient at layer {layer_index} {path}")
                ratios.append(g_vis / g_ans)
            median = float(torch.tensor(ratios).median())
            self.ratios[path] = ratios
            self.rho[path] = [max(r, median) for r in ratios]
            log.info("MBQ rho at %s: %s", path, ", ".join(f"{r:.3g}" for r in self.rho[path]))

    def token_weights(self, ctx: GroupContext) -> TokenWeights:
        if not self.rho:
            raise QigError(
                "MBQ's rho is not known: the answer-loss gradients come first "
                "(qig.pipeline.gradients.prepare_methods, which calls use_answer_gradients)"
            )
        rho = self.rho[ctx.group.sublayer_output][ctx.layer_index]
        out = []
        for roles in ctx.roles:
            w = torch.zeros(roles.shape, dtype=torch.float32, device=roles.device)
            w[roles == ANSWER] = 1.0
            w[roles == VISION] = rho
            out.append(w)
        return TokenWeights(out, {"rho": rho})

    def summary(self) -> dict:
        return {"rho": self.rho, "gradient_ratio": self.ratios}
