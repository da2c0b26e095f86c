"""Where the decoder layers' weights are while the layer loop runs: in the model, or in the checkpoint's shards.

Every pass that visits the decoder layers one at a time (the layer loop, MBQ's
layer-wise gradients) gets each layer through :meth:`DecoderLayers.onload`:
the layer on the compute device for the duration of the ``with`` block.

- :class:`InMemoryLayers`: the model holds every layer; ``onload`` moves the
  layer to the device and back to where it was.
- :class:`CheckpointLayers` (``qig.loading.load_streamed``): the model's decoder
  layers are on the meta device; ``onload`` reads the layer's tensors from the
  checkpoint's safetensors shards onto the device, and releases them to the meta
  device after the block, so host memory holds one layer at a time.

    >>> layers = InMemoryLayers(model, family_for(model))  # doctest: +SKIP
    >>> with layers.onload(0, torch.device("cpu")) as layer:  # doctest: +SKIP
    ...     h = layer(x, **kwargs)

:func:`stream_calls` makes a streamed model run whole (evaluation,
generation): each decoder layer is onloaded when the model calls it and
released when it returns, so every forward pass reads the decoder from disk
once, one layer at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from qig.errors import QigError
from qig.hostmem import trim
from qig.models import ModelFamily, family_for, get_module


class DecoderLayers:
    """The decoder layers of a model, one at a time on the compute device."""

    streamed: bool = False

    def __init__(self, model: torch.nn.Module, family: ModelFamily) -> None:
        self.model, self.family = model, family
        self.modules = family.decoder_layers(model)

    def __len__(self) -> int:
        return len(self.modules)

    def onload(self, index: int, device: torch.device) -> contextlib.AbstractContextManager[torch.nn.Module]:
        raise NotImplementedError

    def layer_bytes(self, index: int) -> int:
        """Bytes of one layer's parameters and buffers (also for layers on the meta device)."""
        module = self.modules[index]
        return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class InMemoryLayers(DecoderLayers):
    """Every layer is in the model; ``onload`` moves one to the device and back."""

    @contextlib.contextmanager
    def onload(self, index: int, device: torch.device) -> Iterator[torch.nn.Module]:
        module = self.modules[index]
        home = next(module.parameters()).device
        module.to(device)
        try:
            yield module
        finally:
            module.to(home)


class CheckpointLayers(DecoderLayers):
    """The layers are on the meta device; ``onload`` reads one from the checkpoint, and releases it after.

    ``index``: where the layers' tensors are (``qig.models.checkpoint.CheckpointIndex``).
    Each tensor is cast to the dtype the meta layer has (the model's load dtype),
    as ``from_pretrained`` casts it, and the layer's weights are checked finite on
    arrival (a corrupt shard is refused before any of its layer is used).
    """

    streamed = True

    def __init__(self, model: torch.nn.Module, family: ModelFamily, index) -> None:
        super().__init__(model, family)
        self.index = index

    @contextlib.contextmanager
    def onload(self, index: int, device: torch.device) -> Iterator[torch.nn.Module]:
        from qig.pipeline.finite import check_layer_weights

        module = self.modules[index]
        tensors = self.index.read_prefix(f"{self.index.prefix}.{index}.", device)
        dtypes = {k: t.dtype for k, t in module.state_dict().items()}
        module.to_empty(device=device)
        try:
            module.load_state_dict({k: t.to(dtypes.get(k, t.dtype)) for k, t in tensors.items()}, strict=True)
            del tensors
            check_layer_weights(module, index, self.family)
            yield module
        finally:
            module.to("meta")
            trim()  # else the freed layer stays in the allocator's heap and host memory grows with the depth


def layers_for(model: torch.nn.Module, family: ModelFamily) -> DecoderLayers:
    """The model's layers: streamed from its checkpoint when it was loaded with ``decoder="disk"``."""
    from qig.models.checkpoint import STREAMED

    index = getattr(model, STREAMED, None)
    return InMemoryLayers(model, family) if index is None else CheckpointLayers(model, family, index)


def stream_calls(model: torch.nn.Module, device: torch.device) -> CheckpointLayers:
    """Make a model loaded with ``decoder="disk"`` run whole on ``device``; returns its layers.

    Everything but the decoder layers moves to ``device``; each decoder layer is
    read from the checkpoint onto ``device`` when the model calls it and released
    to the meta device when the call returns (forward hooks around
    :meth:`CheckpointLayers.onload`; released on an error too). The computation is
    the in-memory model's: the same modules with the same weights, one at a time.
    A forward pass reads every layer once: ``generate`` reads the decoder once per
    new token (the KV cache stays on ``device``).

        >>> model, processor = load_model_and_processor("out/qig-w4", decoder="disk")  # doctest: +SKIP
        >>> stream_calls(model, torch.device("cuda"))  # doctest: +SKIP
        >>> model.generate(**inputs, max_new_tokens=6)  # doctest: +SKIP
    """
    family = family_for(model)
    layers = layers_for(model, family)
    if not isinstance(layers, CheckpointLayers):
        raise QigError("stream_calls needs a model loaded with decoder='disk' (its layers on the meta device)")
    parent, _, name = family.layers.rpartition(".")
    holder, held = get_module(model, parent), get_module(model, family.layers)
    setattr(holder, name, torch.nn.ModuleList())  # out of the tree while the rest moves (meta tensors cannot)
    try:
        model.to(device)
    finally:
        setattr(holder, name, held)
    open_layers: dict[int, contextlib.AbstractContextManager] = {}

    def onload(index: int):
        def hook(_module, _args, _kwargs):
            loading = layers.onload(index, device)
            loading.__enter__()
            open_layers[index] = loading

        return hook

    def release(index: int):
        def hook(_module, _args, _kwargs, _output):
            loading = open_layers.pop(index, None)
            if loading is not None:
                loading.__exit__(None, None, None)

        return hook

    for i, module in enumerate(layers.modules):
        module.register_forward_pre_hook(onload(i), with_kwargs=True)
        module.register_forward_hook(release(i), with_kwargs=True, always_call=True)
    return layers
