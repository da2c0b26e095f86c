"""The two streams of hidden states (METHOD.md section 3), one object, advanced layer by layer.

Per calibration chunk: ``x``, the inputs of layer l in the FP model (after
the folds: a fold keeps the FP function), and ``x^q``, the inputs of layer l
when the layers below are scaled and quantized. A stream the run does not
need is dropped at the first layer (``fp=False`` / ``quantized=False``). Each
advance refuses hidden states that became NaN or inf (one ``isfinite`` per
chunk), naming the layer and the stream.

    >>> streams = Streams(capture(model, family, calib, 8, device), fp=True, quantized=True)  # doctest: +SKIP
    >>> streams.advance_fp(layer, 0)  # doctest: +SKIP
    >>> streams.advance_quantized(layer, 0)  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from qig.dist import ordered
from qig.pipeline.capture import Chunk, next_input
from qig.pipeline.finite import check_hidden

FP_OVERFLOW = "the layer overflows in the model's dtype (load the model in float32) or its weights are corrupt"
QUANTIZED_OVERFLOW = (
    "the quantized layers overflow (use more bits or a smaller group size, or load the model in float32)"
)


class Streams:
    """x and x^q per chunk; ``advance_*`` pushes one stream through a layer (or drops it if not carried)."""

    def __init__(self, chunks: list[Chunk], fp: bool = True, quantized: bool = True) -> None:
        self.chunks = chunks
        self.fp, self.quantized = fp, quantized

    @torch.no_grad()
    def advance_fp(self, layer: torch.nn.Module, layer_index: int) -> None:
        """x <- the FP (folded) layer's output, plus what the model adds after it."""
        for i, c in enumerate(self.chunks):
            h = next_input(layer, c.x, c, layer_index) if self.fp else None
            check_hidden(h, f"layer {layer_index}'s output on the FP stream x", i, FP_OVERFLOW)
            c.x = h

    @torch.no_grad()
    def advance_quantized(
        self, layer: torch.nn.Module, layer_index: int, params: dict[str, torch.Tensor] | None = None
    ) -> None:
        """x^q <- the quantized layer's output: the layer as it is, or with its weights replaced by ``params``."""
        for i, c in enumerate(self.chunks):
            h = next_input(layer, c.xq, c, layer_index, params) if self.quantized else None
            check_hidden(h, f"layer {layer_index}'s output on the quantized stream x^q", i, QUANTIZED_OVERFLOW)
            c.xq = h

    def roles(self) -> torch.Tensor:
        """[N, T] int8, the calibration tokens' roles (every chunk has the same T)."""
        return cat_rows(every_chunk([c.roles for c in self.chunks])).to(torch.int8)


def every_chunk(per_chunk: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-chunk tensors of every rank, on the CPU, in global chunk order (this rank's alone for one process)."""
    return ordered([t.cpu() for t in per_chunk])


def cat_rows(ws: list[torch.Tensor]) -> torch.Tensor:
    """Per-chunk [b, T] tensors stacked into one [N, T] float32 on the CPU (every chunk has the same T)."""
    return torch.cat([w.float().cpu() for w in ws], dim=0)
