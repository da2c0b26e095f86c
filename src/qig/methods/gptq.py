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

from qig.methods.base import GroupContext, Method, TokenWeights, method_for, register
from qig.methods.config import GPTQConfig


@register(GPTQConfig)
class GPTQ(Method):
    finds_scales = False

    def __init__(self, config: GPTQConfig) -> None:
        super().__init__(config)
        self.weighting = method_for(config.token_weights) if config.token_weights is not None else None
        self.weights_tokens = self.weighting is not None
        self.needs_quantized_stream = self.weighting is not None and self.weighting.needs_quantized_stream

    def prepare(self, model, family, calib, device) -> None:
        if self.weighting is not None:
            self.weighting.prepare(model, family, calib, device)

    def token_weights(self, ctx: GroupContext) -> TokenWeights:
        assert self.weighting is not None, "plain GPTQ weighs every real token 1; the pipeline does not ask"
        return self.weighting.token_weights(ctx)

    def summary(self) -> dict:
        return self.weighting.summary() if self.weighting is not None else {}
