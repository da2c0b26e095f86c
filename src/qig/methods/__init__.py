"""PTQ methods: RTN, GPTQ, SmoothQuant, and AWQ / MBQ / QIG as one search with three token weightings.

>>> from qig.methods import QIGConfig, method_for
>>> type(method_for(QIGConfig(wbits=3))).__name__
'QIG'
"""

from qig.methods import awq, gptq, mbq, qig, rtn, smoothquant  # noqa: F401  (registers the methods)
from qig.methods.base import GroupContext, Method, TokenWeights, method_for, register
from qig.methods.config import (
    CONFIGS,
    AWQConfig,
    GPTQConfig,
    MBQConfig,
    QIGConfig,
    QuantConfig,
    RTNConfig,
    SearchConfig,
    SmoothQuantConfig,
    config_class,
    make_config,
)
from qig.methods.search import SearchResult, search_scales

__all__ = [
    "CONFIGS",
    "AWQConfig",
    "GPTQConfig",
    "GroupContext",
    "MBQConfig",
    "Method",
    "QIGConfig",
    "QuantConfig",
    "RTNConfig",
    "SearchConfig",
    "SearchResult",
    "SmoothQuantConfig",
    "TokenWeights",
    "config_class",
    "make_config",
    "method_for",
    "register",
    "search_scales",
]
