"""What finishes a decoder layer once its scale groups are done: the layer loop's strategies.

Three finishers, each with ``apply`` (the layer the loop has just searched)
and ``replay`` (the layer loaded back from a journal, whose finished state
already holds the quantized weights):

- :class:`RoundToNearest` quantizes the layer's linears in place with the
  shared quantizer and keeps its parameters; in W-A modes it installs the
  per-token activation quantizers too (NVFP4's with the per-tensor scale each
  linear's input takes on the calibration tokens of x^q, kept with the
  parameters as ``input_global_scale``).
- :class:`GPTQ` quantizes them in place with GPTQ (Hessians from x^q,
  optionally token-weighted), keeping the parameters and its seconds.
- :class:`LookOnly` (``qig inspect``) leaves the model untouched: the
  weights are quantized on the side, for x^q only.

    >>> RoundToNearest(QuantSpec(bits=3)).label
    'rtn'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from qig.calib import PAD
from qig.dist import gather
from qig.models import ModelFamily, linears
from qig.pipeline.capture import Chunk, next_input
from qig.pipeline.gptq import gptq_layer_
from qig.pipeline.streams import Streams
from qig.pipeline.timing import Timer
from qig.quant.activation import install_activation_quantizer_, install_activation_quantizers
from qig.quant.gptq import GPTQSettings
from qig.quant.rtn import rtn_
from qig.quant.spec import QuantSpec, fake_quantize, global_scale


@dataclass
class LayerState:
    """One decoder layer while the loop is on it."""

    index: int
    module: torch.nn.Module
    done: dict[str, torch.Tensor] = field(default_factory=dict)  # "path.weight": finished groups, quantized
    hessian_weights: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # group -> per chunk [b, T]
    clips: dict[str, torch.Tensor] = field(default_factory=dict)  # "path": clip ratios [out, n_groups]


@dataclass
class Finished:
    """What finishing one layer gave: the quantizer's parameters per linear, the weights x^q meets, seconds.

    quantized: ``{"linear path": params}``. xq_weights: ``{"path.weight": W}`` for
    x^q when the model itself was not quantized (None: the model's own). seconds:
    the finisher's own time when it keeps it (GPTQ), else None.
    """

    quantized: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    xq_weights: dict[str, torch.Tensor] | None = None
    seconds: float | None = None


class Finisher:
    """Finishes a layer after its groups. label: the progress bar's. quantizes: it writes into the model."""

    label: ClassVar[str]
    quantizes: ClassVar[bool] = True
    needs_quantized_stream: ClassVar[bool] = False  # x^q is carried for it (GPTQ's Hessians)

    def apply(self, layer: LayerState, family: ModelFamily, streams: Streams | None, timer: Timer) -> Finished:
        raise NotImplementedError

    def replay(self, module: torch.nn.Module, quantized: dict[str, dict[str, torch.Tensor]]) -> None:
        """What a finished state loaded from the journal lacks (nothing, unless activations are quantized).

        quantized: the layer's parameters per linear (its name in the layer), as :meth:`apply` kept them.
        """


@dataclass(frozen=True)
class RoundToNearest(Finisher):
    """RTN with ``spec``; with ``act_spec`` (W-A) the linears quantize their inputs per token from then on."""

    spec: QuantSpec
    act_spec: QuantSpec | None = None
    label: ClassVar[str] = "rtn"

    def apply(self, layer: LayerState, family: ModelFamily, streams: Streams | None, timer: Timer) -> Finished:
        quantized = rtn_(linears(layer.module), self.spec)
        if self.act_spec is not None and self.act_spec.number == "nvfp4":
            install_activation_quantizers(linears(layer.module).values(), self.act_spec)  # per-tensor: dynamic
            for name, top in input_maxima(layer.module, streams.chunks, layer.index).items():
                quantized[name]["input_global_scale"] = global_scale(top, self.act_spec)
        self.replay(layer.module, quantized)
        return Finished(quantized)

    def replay(self, module: torch.nn.Module, quantized: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.act_spec is None:
            return
        for name, lin in linears(module).items():
            scale = quantized.get(name, {}).get("input_global_scale")
            install_activation_quantizer_(lin, self.act_spec, None if scale is None else scale.to(lin.weight.device))


@torch.no_grad()
def input_maxima(module: torch.nn.Module, chunks: list[Chunk], layer_index: int) -> dict[str, torch.Tensor]:
    """Per linear of the layer, max |input| over the real tokens of every chunk's x^q (every rank's): [1] each.

    The layer runs as it is (quantized weights, and whatever activation quantizers it holds).
    """
    tops: dict[str, torch.Tensor] = {}

    def observe(name: str, real: torch.Tensor):
        def hook(_module, args):
            x = args[0][real] if real.shape == args[0].shape[:-1] else args[0]  # [tokens, C]
            top = x.detach().abs().amax().float().reshape(1).cpu()
            tops[name] = top if name not in tops else torch.maximum(tops[name], top)

        return hook

    for chunk in chunks:
        real = chunk.roles != PAD  # [b, T]
        handles = [m.register_forward_pre_hook(observe(n, real)) for n, m in linears(module).items()]
        try:
            next_input(module, chunk.xq, chunk, layer_index)
        finally:
            for h in handles:
                h.remove()
    names = sorted(tops)
    every = gather(torch.stack([tops[n] for n in names]))  # every rank's, the same order
    return {n: torch.stack([t[i] for t in every]).amax(0) for i, n in enumerate(names)}


@dataclass(frozen=True)
class GPTQ(Finisher):
    """GPTQ with ``spec`` and ``settings``, on x^q; Hessians weighted by ``layer.hessian_weights`` when given."""

    spec: QuantSpec
    settings: GPTQSettings
    label: ClassVar[str] = "gptq"
    needs_quantized_stream: ClassVar[bool] = True

    def apply(self, layer: LayerState, family: ModelFamily, streams: Streams | None, timer: Timer) -> Finished:
        with timer("gptq") as lap:
            quantized = gptq_layer_(
                layer.module, family, streams.chunks, layer.index, self.spec, self.settings, layer.hessian_weights
            )
        return Finished(quantized, seconds=lap.seconds)


@dataclass(frozen=True)
class LookOnly(Finisher):
    """The model untouched: x^q meets the finished groups' quantized weights and the others quantized on the side."""

    spec: QuantSpec
    label: ClassVar[str] = "side"
    quantizes: ClassVar[bool] = False

    def apply(self, layer: LayerState, family: ModelFamily, streams: Streams | None, timer: Timer) -> Finished:
        weights = {f"{n}.weight": m.weight.data for n, m in linears(layer.module).items()}
        done = layer.done  # the finished groups' (and, since the start, the ungrouped linears') quantized weights
        quantized = {k: done[k] if k in done else fake_quantize(w, self.spec) for k, w in weights.items()}
        return Finished(xq_weights=quantized)
