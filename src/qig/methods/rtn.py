"""RTN: round-to-nearest with the shared quantizer; no calibration, no search.

>>> from qig.methods import method_for, RTNConfig
>>> method_for(RTNConfig(wbits=4)).finds_scales
False
"""

from __future__ import annotations

from qig.methods.base import Method, register
from qig.methods.config import RTNConfig


@register(RTNConfig)
class RTN(Method):
    finds_scales = False
