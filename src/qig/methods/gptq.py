"""GPTQ as a method: no scale search; optionally another method's token weights for the Hessian.

Plain GPTQ weighs every real token 1. ``GPTQConfig(token_weights=QIGConfig(...))``
borrows QIG's per-group token weights (MBQ's likewise), so the pipeline asks
this method for token weights group by group exactly as it asks a search
method, and weights the Hessian of the group's linears with them. The
quantization itself (``qig.quant.gptq``) is run by the pipeline, which owns
the streams, for every config whose ``gptq_settings`` is set (a searched
config with ``quantizer="gptq"`` too).

    >>> from qig.methods import GPTQConfig, method_for
    >>> m = method_for(GPTQConfig.weighted_by("qig", wbits=3))
    >>> m.finds_scales, m.weights_tokens, m.needs_quantized_stream
    (False, True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from qig.errors import QigError
from qig.methods.base import GroupContext, Method, TokenWeights, method_for, register
from qig.methods.config import WEIGHT_ONLY_ABITS, QuantConfig, SearchConfig, make_config, token_weighting_names
from qig.options import option
from qig.quant.gptq import GPTQSettings


@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    """GPTQ (METHOD.md section 7): no scale search; each linear quantized with error compensation.

    gptq: block size, dampening, act-order. token_weights: None for the plain
    Hessian H = 2 X^T X (every real token weighs 1), or the config of a
    token-weighting method (``MBQConfig`` / ``QIGConfig``; ``AWQConfig``
    weighs every token 1, i.e. plain GPTQ) whose per-group token weights
    turn it into H = 2 X^T diag(w) X (METHOD.md section 5). That config's
    quantizer (wbits, group_size) must be this one's: its weights measure
    this quantizer's error. Its search fields (n_grid, loss) are unused.

    >>> GPTQConfig(wbits=3, gptq=GPTQSettings(act_order=True)).gptq_settings.act_order
    True
    """

    name: ClassVar[str] = "gptq"
    gptq: GPTQSettings = option(GPTQSettings(), "GPTQ's settings")  # frozen, so a shared default is safe
    token_weights: SearchConfig | None = option(
        None,
        "GPTQ: the method whose token weights weight the Hessian (default uniform)",
        hint=lambda: f"the config of one of {', '.join(token_weighting_names())}; None: the plain Hessian",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.abits < WEIGHT_ONLY_ABITS:
            raise QigError(
                f"GPTQ is weight-only here; abits {self.abits} is not available with it. Use abits=16, or "
                "rtn, smoothquant, awq, mbq or qig for weight-activation modes"
            )
        self.gptq.check(self.spec)
        tw = self.token_weights
        if tw is None:
            return
        if tw.spec != self.spec:
            raise QigError(
                f"token_weights {tw.name} is set for {tw.spec.label()} but GPTQ quantizes {self.spec.label()}; "
                "give both the same wbits and group_size (or use GPTQConfig.weighted_by)"
            )
        lent = [k for k in ("weight_clip", "duo_scaling") if getattr(tw, k)]
        if lent:
            flags = ", ".join("--" + k.replace("_", "-") for k in lent)
            raise QigError(
                f"token_weights {tw.name} only lends its token weights, so {flags} (of its scale search) would do "
                f"nothing; drop {flags}, or search scales before GPTQ: --method {tw.name} --quantizer gptq {flags}"
            )
        if tw.quantizer != "rtn":
            raise QigError(
                f"token_weights {tw.name} only lends its token weights; its quantizer must stay 'rtn', not "
                f"{tw.quantizer!r} (GPTQ is this config's quantizer)"
            )

    @property
    def gptq_settings(self) -> GPTQSettings:
        return self.gptq

    @classmethod
    def weighted_by(cls, method: str, wbits: int = 4, group_size: int | None = 128, **fields) -> GPTQConfig:
        """GPTQ whose Hessian is weighted by ``method``'s token weights (a search method: awq, mbq, qig).

        ``fields`` go to GPTQConfig where it has them (gptq, batch_size, batch_tokens), the rest
        to the weighting method's config (e.g. steps=8 for QIG).

        >>> GPTQConfig.weighted_by("mbq", wbits=3).token_weights.name
        'mbq'
        """
        own = {k: fields.pop(k) for k in ("gptq", "batch_size", "batch_tokens") if k in fields}
        allowed = token_weighting_names()
        if method not in allowed:
            raise QigError(f"token weights {method!r} are not available; use one of: {', '.join(allowed)}")
        weighting = make_config(method, wbits=wbits, group_size=group_size, **fields)
        return cls(wbits=wbits, group_size=group_size, token_weights=weighting, **own)


@register(GPTQConfig)
class GPTQ(Method):
    finds_scales = False

    def __init__(self, config: GPTQConfig) -> None:
        super().__init__(config)
        self.weighting = method_for(config.token_weights) if config.token_weights is not None else None
        self.weights_tokens = self.weighting is not None
        self.needs_quantized_stream = self.weighting is not None and self.weighting.needs_quantized_stream
        self.needs_answer_gradients = self.weighting is not None and self.weighting.needs_answer_gradients
        if self.weighting is not None:
            self.answer_gradient_batch_size = self.weighting.answer_gradient_batch_size

    def prepare(self, model, family, calib, device) -> None:
        if self.weighting is not None:
            self.weighting.progress = self.progress
            self.weighting.prepare(model, family, calib, device)

    def path_points(self) -> int:
        return self.weighting.path_points() if self.weighting is not None else 0

    def use_answer_gradients(self, sums: dict[str, list[dict]]) -> None:
        assert self.weighting is not None, "plain GPTQ asks for no answer-loss gradients"
        self.weighting.use_answer_gradients(sums)

    def token_weights(self, ctx: GroupContext) -> TokenWeights:
        assert self.weighting is not None, "plain GPTQ weighs every real token 1; the pipeline does not ask"
        return self.weighting.token_weights(ctx)

    def summary(self) -> dict:
        return self.weighting.summary() if self.weighting is not None else {}
