"""Round-to-nearest of a set of linear layers, in place, with the shared quantizer.

The quantizer's parameters come back, so the quantized state is kept rather
than read back from the weights later (the export packs from them):

>>> import torch
>>> from qig.quant import QuantSpec
>>> from qig.quant.rtn import rtn_
>>> lin = torch.nn.Linear(256, 8)
>>> params = rtn_({"lin": lin}, QuantSpec(bits=3, group_size=128))
>>> params["lin"]["scale"].shape
torch.Size([8, 2])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from qig.quant.spec import QuantSpec, dequantize, global_scale, quantize


@torch.no_grad()
def rtn_(linears: Mapping[str, torch.nn.Linear], spec: QuantSpec) -> dict[str, dict[str, torch.Tensor]]:
    """Replace each linear's weight by its fake-quantized value (bias untouched); return each one's parameters.

    Returns ``{name: {"scale", "zero"}}``, both [out, n_groups] float32 on the
    CPU: the weight is exactly ``dequantize(quantize_with(w, scale, zero))``;
    NVFP4 adds the weight's ``global_scale`` [1].
    """
    params = {}
    for name, lin in linears.items():
        spec.check(lin.in_features, name)
        w = lin.weight.data
        tensor_scale = global_scale(w, spec)
        q, scale, zero = quantize(w, spec, tensor_scale)
        lin.weight.copy_(dequantize(q, scale, zero, spec).to(w.dtype))  # = fake_quantize(w, spec)
        params[name] = {"scale": scale.cpu(), "zero": zero.cpu()}
        if tensor_scale is not None:
            params[name]["global_scale"] = tensor_scale.cpu()
    return params
