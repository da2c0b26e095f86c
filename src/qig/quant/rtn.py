"""Round-to-nearest of a set of linear layers, in place, with the shared quantizer.

>>> import torch
>>> from qig.quant import QuantSpec
>>> from qig.quant.rtn import rtn_
>>> lin = torch.nn.Linear(256, 8)
>>> rtn_({"lin": lin}, QuantSpec(bits=3, group_size=128))
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from qig.quant.spec import QuantSpec, fake_quantize


@torch.no_grad()
def rtn_(linears: Mapping[str, torch.nn.Linear], spec: QuantSpec) -> None:
    """Replace each linear's weight by its fake-quantized value (bias untouched)."""
    for name, lin in linears.items():
        spec.check(lin.in_features, name)
        lin.weight.copy_(fake_quantize(lin.weight.data, spec))
