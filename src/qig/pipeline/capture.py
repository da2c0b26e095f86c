"""Capture: the inputs of every decoder layer's first call, and how the next layer's input follows.

The model runs with its decoder layers swapped for catchers that record the
hidden states and keyword arguments (position embeddings, masks) each layer
receives and pass the hidden states on unchanged; what the model adds between
layers (Qwen3-VL's DeepStack features) is recorded too and replayed by
:func:`next_input`. Hidden states that arrive NaN or inf are refused here,
before any layer is quantized.

    >>> chunks = capture(model, family_for(model), calib, batch_size=8, device=torch.device("cpu"))  # doctest: +SKIP
    >>> h = next_input(layer0, chunks[0].x, chunks[0], 0)  # doctest: +SKIP

:func:`input_of` feeds a layer up to a given linear and returns that linear's
input (a group's input, a GPTQ stage's Hessian input).
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from qig.calib import CalibrationSet
from qig.dist import current
from qig.errors import QigError
from qig.hostmem import to_device, to_host
from qig.models import ModelFamily
from qig.pipeline.finite import check_hidden

BEFORE_LAYERS = (
    "the embeddings, vision tower or projector produce them (check the checkpoint and the images, "
    "or load the model in float32)"
)


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (its caller catches it); ``x``: what the hook caught, if any."""

    def __init__(self, x: torch.Tensor | None = None) -> None:
        super().__init__()
        self.x = x


class Chunk:
    """One calibration batch as it moves through the decoder.

    x / xq: [b, T, C] inputs of the current layer on the FP / quantized stream
    (the same tensor until they diverge; None when not carried). layer_kwargs:
    per layer, the keyword arguments the model passes to it. roles: [b, T].
    injections: per layer index, what the model adds to the hidden states after
    that layer, outside the decoder layers ([b, T, C]; Qwen3-VL's DeepStack
    features), replayed by :func:`next_input`.

    offloaded: x and xq are kept on the host between uses (pinned memory under
    CUDA) and copied to the compute device each time they are read; assigning
    copies to the host. Otherwise they stay on the compute device and reading
    gives the tensor itself (no copy). On a CPU device an offloaded chunk still
    copies, so the offload path is exercised (and tested) without a GPU.
    """

    def __init__(
        self,
        x: torch.Tensor | None,
        xq: torch.Tensor | None,
        roles: torch.Tensor,
        layer_kwargs: list[dict],
        injections: dict[int, torch.Tensor] | None = None,
        offloaded: bool = False,
    ) -> None:
        self.roles, self.layer_kwargs, self.injections = roles, layer_kwargs, injections or {}
        self.device, self.offloaded = roles.device, offloaded
        self._x = self._put(x)
        self._xq = self._x if xq is x else self._put(xq)

    def _put(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or not self.offloaded else to_host(t)

    def _get(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or not self.offloaded else to_device(t, self.device)

    @property
    def x(self) -> torch.Tensor | None:
        return self._get(self._x)

    @x.setter
    def x(self, value: torch.Tensor | None) -> None:
        self._x = self._put(value)

    @property
    def xq(self) -> torch.Tensor | None:
        return self._get(self._xq)

    @xq.setter
    def xq(self, value: torch.Tensor | None) -> None:
        self._xq = self._put(value)

    @property
    def batch(self) -> int:
        return self.roles.shape[0]


class _Catcher(torch.nn.Module):
    """Stands in for a decoder layer during capture: records its call, passes hidden states on.

    as_tuple: pass them on as ``(hidden_states,)``, for models whose layers return a tuple.
    """

    def __init__(self, index: int, last: bool, sink: dict, as_tuple: bool = False) -> None:
        super().__init__()
        self.index, self.last, self.sink, self.as_tuple = index, last, sink, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise QigError("decoder layers called with extra positional arguments are not supported yet")
        self.sink.setdefault("hidden", hidden_states)
        self.sink.setdefault("inputs", []).append(hidden_states)
        self.sink.setdefault("kwargs", []).append(kwargs)
        if self.last:
            raise StopForward
        return (hidden_states,) if self.as_tuple else hidden_states


@torch.no_grad()
def capture(
    model: torch.nn.Module,
    family: ModelFamily,
    calib: CalibrationSet,
    batch_size: int,
    device: torch.device,
    offload: bool = False,
) -> list[Chunk]:
    """Inputs of layer 0 and every layer's keyword arguments, per calibration batch, on ``device``.

    offload: the chunks keep their hidden states on the host (see :class:`Chunk`).
    """
    layers = family.decoder_layers(model)
    originals = list(layers)
    home = next(model.parameters()).device
    chunks = []
    try:
        for i in range(len(layers)):
            layers[i] = _Catcher(i, i == len(layers) - 1, {}, family.layer_returns_tuple)
        model.to(device)  # everything but the decoder layers, which are out of the tree now
        ranks, n_chunks = current(), calib.n_batches(batch_size)
        if n_chunks < ranks.size:
            raise QigError(
                f"{len(calib)} calibration samples in batches of {batch_size} make {n_chunks} chunks, fewer than the "
                f"{ranks.size} processes; use more samples or a smaller --batch-size (or --batch-tokens)"
            )
        mine = set(ranks.mine(n_chunks))  # this rank's chunks (all, for one process)
        for b, batch in enumerate(calib.batches(batch_size)):
            if b not in mine:
                continue
            sink: dict = {}
            for c in layers:
                c.sink = sink
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            try:
                model(**inputs, use_cache=False)
            except StopForward:
                pass
            if "hidden" not in sink:
                raise QigError("the model never called its first decoder layer; is the family mapping right?")
            kwargs = [_plain_kwargs(kw) for kw in sink["kwargs"]]
            x = sink["hidden"]
            injections = _between_layers(sink["inputs"], family)
            check_hidden(x, "the input of decoder layer 0", len(chunks), BEFORE_LAYERS)
            for li, extra in injections.items():
                check_hidden(extra, f"what the model adds after decoder layer {li}", len(chunks), BEFORE_LAYERS)
            chunks.append(Chunk(x, x, batch.roles.to(device), kwargs, injections, offload))
    finally:
        model.to(home)
        for i, layer in enumerate(originals):
            layers[i] = layer
    return chunks


def _between_layers(inputs: list[torch.Tensor], family: ModelFamily) -> dict[int, torch.Tensor]:
    """What the model adds to the hidden states between layers l and l+1, seen with identity layers.

    The catchers pass hidden states on unchanged, so layer l+1 receives the very
    tensor layer l did unless the model changed it in between (DeepStack).
    """
    out = {}
    for i, (a, b) in enumerate(zip(inputs, inputs[1:], strict=False)):
        if b is a:
            continue
        if not family.adds_between_layers:
            raise QigError(
                f"the model changes the hidden states between decoder layers {i} and {i + 1}, outside the layers, "
                f"and the {family.name} family entry does not declare it; set adds_between_layers in its entry "
                "(qig.models.families) if the change is an addition that does not depend on the hidden states"
            )
        out[i] = b - a  # [b, T, C]
    return out


def _plain_kwargs(kwargs: dict) -> dict:
    # No KV cache while calibrating: every layer call is a fresh full-sequence call.
    out = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
    out["use_cache"] = False
    return out


def input_of(
    layer: torch.nn.Module, linear: torch.nn.Module, h: torch.Tensor, kwargs: dict, params=None
) -> torch.Tensor | None:
    """The input of ``linear`` when ``layer`` runs on ``h`` (with weight overrides ``params``), the layer stopped there.

    None when the layer never calls ``linear``.
    """

    def stop(_module, args):
        raise StopForward(args[0])

    handle = linear.register_forward_pre_hook(stop)
    try:
        if params:
            functional_call(layer, params, (h,), kwargs, strict=False)
        else:
            layer(h, **kwargs)
    except StopForward as stopped:
        return stopped.x
    finally:
        handle.remove()
    return None


def next_input(layer: torch.nn.Module, h: torch.Tensor, chunk: Chunk, layer_index: int, params=None) -> torch.Tensor:
    """The next layer's input: ``layer(h)`` (with weight overrides ``params``) plus what the model adds after it."""
    kwargs = chunk.layer_kwargs[layer_index]
    out = layer(h, **kwargs) if params is None else functional_call(layer, params, (h,), kwargs, strict=False)
    if isinstance(out, tuple):  # remote-code layers (InternLM2) return (hidden_states, ...)
        out = out[0]
    extra = chunk.injections.get(layer_index)
    return out if extra is None else out + extra
