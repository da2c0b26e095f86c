"""AWQ: the shared search with weight 1 on every real (non-pad) token (pads too under ``pad_tokens="count"``).

>>> from qig.methods import method_for, AWQConfig
>>> method_for(AWQConfig(wbits=3)).needs_quantized_stream
False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from qig.methods.base import GroupContext, Method, TokenWeights, counted_tokens, register
from qig.methods.config import SearchConfig


@dataclass(frozen=True)
class AWQConfig(SearchConfig):
    """AWQ: every real token weighs 1.

    >>> AWQConfig(wbits=3).loss
    'mae'
    """

    name: ClassVar[str] = "awq"


@register(AWQConfig)
class AWQ(Method):
    def token_weights(self, ctx: GroupContext) -> TokenWeights:
        return TokenWeights([counted_tokens(r, self.config.pad_tokens).float() for r in ctx.roles], {})
