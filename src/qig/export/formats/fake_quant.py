"""``--format fake-quant``: a plain checkpoint whose decoder linears hold their dequantized weights.

Any setting is held (activation bits are recorded in the run files, not in
the weights); transformers loads it as an ordinary model and ``qig eval``
re-installs the activation quantizers from its record.
"""

from __future__ import annotations

import torch

from qig.export.formats.base import ExportFormat, register


@register
class FakeQuant(ExportFormat):
    name = "fake-quant"
    help = "dequantized weights in the model dtype (transformers, qig eval)"

    @torch.no_grad()
    def write_layer(self, model, quantized) -> None:
        for path, qw in quantized.items():
            mod = model.get_submodule(path)
            mod.weight.copy_(qw.dequantize(mod.weight.dtype))
