"""PTQ methods: RTN, GPTQ, SmoothQuant, and AWQ / MBQ / QIG as one search with three token weightings.

Each module holds one method's config and its implementation and registers
them; the names below are the registry's.

>>> from qig.methods import QIGConfig, method_for
>>> type(method_for(QIGConfig(wbits=3))).__name__
'QIG'
>>> sorted(CONFIGS)
['awq', 'gptq', 'mbq', 'qig', 'rtn', 'smoothquant']
"""

from qig.methods.awq import AWQConfig
from qig.methods.base import GroupContext, Method, TokenWeights, method_for, needs_calibration, register
from qig.methods.config import (
    CONFIGS,
    QuantConfig,
    SearchConfig,
    config_class,
    config_from_options,
    make_config,
    token_weighting_names,
)
from qig.methods.gptq import GPTQConfig
from qig.methods.mbq import MBQConfig
from qig.methods.qig import QIGConfig
from qig.methods.rtn import RTNConfig
from qig.methods.search import SearchResult, search_scales
from qig.methods.smoothquant import SmoothQuantConfig

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
    "config_from_options",
    "make_config",
    "method_for",
    "needs_calibration",
    "register",
    "search_scales",
    "token_weighting_names",
]
