"""RTN: round-to-nearest with the shared quantizer; no calibration, no search.

>>> from qig.methods import method_for, RTNConfig
>>> method_for(RTNConfig(wbits=4)).finds_scales
False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from qig.errors import QigError
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

    def __post_init__(self) -> None:
        super().__post_init__()
        act = self.act_spec
        if act is not None and act.number == "nvfp4":
            raise QigError(
                "NVFP4 activations need a per-tensor scale calibrated on data, and rtn reads none; use "
                "--method awq --n-grid 1 (round-to-nearest with calibrated activation scales), another "
                "calibrated method, or --scheme NVFP4A16 for weight-only"
            )


@register(RTNConfig)
class RTN(Method):
    finds_scales = False
    needs_calibration = False
