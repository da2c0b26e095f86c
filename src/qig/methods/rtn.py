"""RTN: round-to-nearest with the shared quantizer; no calibration, no search.

>>> from qig.methods import method_for, RTNConfig
>>> method_for(RTNConfig(wbits=4)).finds_scales
False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from qig.methods.base import Method, register
from qig.methods.config import QuantConfig


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round-to-nearest: no calibration, no search.

    >>> RTNConfig(wbits=4, group_size=128).name
    'rtn'
    """

    name: ClassVar[str] = "rtn"
    unused: ClassVar[tuple[str, ...]] = ("batch_size", "batch_tokens")  # no calibration forward to batch


@register(RTNConfig)
class RTN(Method):
    finds_scales = False
    needs_calibration = False
