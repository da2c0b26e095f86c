"""The memory plan of a run, worked out and logged before any work: what is held, how big, and where.

Bytes are counted from shapes (samples x padded tokens x width x dtype), not
measured: the two calibration streams, one decoder layer, the largest group's
inputs (x and x^q of the group, and the reference outputs the search scores
against), one chunk's activations through a layer, QIG's path batch (K path
points of one chunk through the block, with their gradients), GPTQ's Hessians
of one layer, MBQ's stored layer inputs (its layer-wise gradient pass), the
parts of the model outside the decoder.

What can wait on the host, and comes to the device one calibration chunk at a
time, is placed by ``--offload-streams`` (:func:`_place`): "auto" keeps the
streams on the host when the device would not hold the plan (past
``DEVICE_SHARE`` of its free memory), then the group inputs and reference
outputs too if it still would not; "cpu" keeps both on the host, "none"
neither. An offloaded item leaves one chunk's share of it on the device.
Offloading changes no bit of the result (the copies are exact); it costs a
host-to-device copy of every chunk on each use: the streams once per layer and
stream, the group inputs and reference outputs once per candidate scale.

    >>> plan = memory_plan(model, family, layers, calib, config, method, torch.device("cuda"))  # doctest: +SKIP
    >>> print(plan.describe())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from qig.errors import QigError
from qig.methods.qig import points_per_pass
from qig.models import ModelFamily, get_module, linears
from qig.pipeline.loop import search_mode

log = logging.getLogger(__name__)

OFFLOAD_CHOICES = ("auto", "cpu", "none")
DEVICE_SHARE = 0.8  # auto offload: an item stays on the device if the plan fits in this share of its free memory
STREAMS = "calibration streams"
GROUP_INPUTS = "largest group's inputs and reference outputs"
OFFLOADABLE = (STREAMS, GROUP_INPUTS)  # in the order "auto" moves them to the host


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


@dataclass
class MemoryPlan:
    """Bytes of what a run holds, by item; ``where``: the item's place ("device", "host", "disk")."""

    items: dict[str, int] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    device_free: int | None = None
    chunk_share: float = 1.0  # one calibration chunk's share of the samples (what an offloaded item leaves)

    def add(self, name: str, n: int, where: str) -> None:
        self.items[name], self.where[name] = int(n), where

    def on(self, where: str) -> int:
        return sum(n for k, n in self.items.items() if self.where[k] == where)

    def key(self, prefix: str) -> str | None:
        """The item named ``prefix ...``, if the plan has one."""
        return next((k for k in self.items if k.startswith(prefix)), None)

    def on_host(self, prefix: str) -> bool:
        """Whether the item named ``prefix ...`` (``STREAMS``, ``GROUP_INPUTS``) waits on the host."""
        key = self.key(prefix)
        return key is not None and self.where[key] == "host"

    def describe(self) -> str:
        width = max(len(k) for k in self.items)
        lines = [f"memory plan ({self.device}):"]
        lines += [f"  {k:<{width}}  {gib(n):>10}  {self.where[k]}" for k, n in self.items.items()]
        peak = f"device peak about {gib(self.on('device'))}"
        if self.device_free is not None:
            peak += f" of {gib(self.device_free)} free"
        lines.append(f"  {peak}; host about {gib(self.on('host'))}")
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


def memory_plan(
    model: torch.nn.Module,
    family: ModelFamily,
    layers,
    calib,
    config,
    method,
    device: torch.device,
    streams: tuple[bool, bool] = (True, True),
    offload: str = "auto",
) -> MemoryPlan:
    """The plan of a calibrated run (see the module doc); ``streams``: whether x and x^q are carried."""
    if offload not in OFFLOAD_CHOICES:
        raise QigError(f"offload_streams {offload!r} is not one of {', '.join(OFFLOAD_CHOICES)}")
    plan = MemoryPlan(device=str(device))
    _add_items(
        plan, model, family, layers, len(calib), calib.seq_len, config, method, streams, _outside_bytes(model, family)
    )
    free = _device_free(device)
    plan.device_free = free
    _place(plan, offload, device)
    return plan


def shape_plan(
    model: torch.nn.Module,
    family: ModelFamily,
    n_samples: int,
    seq_len: int,
    config,
    method,
    device_memory: int,
    offload: str = "auto",
) -> MemoryPlan:
    """The plan of a calibrated run on one GPU with ``device_memory`` bytes free, from shapes alone (no weights).

    ``model`` may live on the meta device (built from its config): every item is counted from
    shapes, the model outside the decoder included. ``n_samples`` samples of ``seq_len`` tokens
    stand for the calibration set; the streams are those :func:`qig.pipeline.run.run_layerwise`
    carries for ``config``. The items and the offload rule are :func:`memory_plan`'s.

        >>> family, method = family_for(meta_model), method_for(config)  # doctest: +SKIP
        >>> plan = shape_plan(meta_model, family, 128, 2400, config, method, 80 * 2**30)  # doctest: +SKIP
    """
    if offload not in OFFLOAD_CHOICES:
        raise QigError(f"offload_streams {offload!r} is not one of {', '.join(OFFLOAD_CHOICES)}")
    from qig.pipeline.layers import InMemoryLayers

    device = torch.device("cuda")
    plan = MemoryPlan(device=f"one GPU, {gib(device_memory)}", device_free=int(device_memory))
    streams = run_streams(config, method)
    outside = _outside_bytes(model, family, count_meta=True)
    _add_items(plan, model, family, InMemoryLayers(model, family), n_samples, seq_len, config, method, streams, outside)
    if not any(streams):  # RTN: no calibration data, no streams
        key = plan.key(STREAMS)
        del plan.items[key], plan.where[key]
        plan.notes.append(f"{config.name} needs no calibration data")
        return plan
    _place(plan, offload, device)
    return plan


def run_streams(config, method) -> tuple[bool, bool]:
    """Whether a calibrated run of ``config`` carries x and x^q: the rule of :func:`qig.pipeline.run.run_layerwise`."""
    if not (method.finds_scales or config.gptq_settings is not None):
        return (False, False)  # RTN: no calibration, no streams
    return search_mode(config, method).carried


def _add_items(plan: MemoryPlan, model, family, layers, n: int, t: int, config, method, streams, outside: int) -> None:
    """The items of :func:`memory_plan` for ``n`` samples padded to ``t`` tokens."""
    first = layers.modules[0]
    dtype_bytes = next(first.parameters()).element_size()
    hidden = family.decoder_linears(model)
    width = next(iter(hidden.values())).in_features if hidden else 0
    stream = n * t * width * dtype_bytes
    plan.add("model outside the decoder", outside, "host")
    plan.add("one decoder layer", layers.layer_bytes(0), "device")
    if layers.streamed:
        plan.add(f"decoder layers ({len(layers)}, read one at a time)", layers.layer_bytes(0) * len(layers), "disk")
    else:
        plan.add(f"decoder layers ({len(layers)})", layers.layer_bytes(0) * len(layers), "host")
    carried = sum(streams)
    plan.add(f"{STREAMS} ({carried} x {n} samples x {t} tokens x {width})", carried * stream, "device")
    widest = max((m.in_features for m in linears(first).values()), default=0)
    b = min(config.samples_per_batch(t), n)  # samples per calibration chunk
    plan.chunk_share = b / n
    chunk = b * t * widest * dtype_bytes  # one chunk at the widest width (the MLP's intermediate)
    if carried:  # a calibrated run (RTN has no chunks)
        plan.add(f"one chunk's activations ({b} samples, ~3 x width {widest})", 3 * chunk, "device")
    grouped = max((get_module(first, g.linears[0]).in_features for g in family.active_groups(first)), default=0)
    if method.finds_scales or method.weights_tokens:
        # the group's input on each carried stream; the block's output (the reference) at the stream's width
        group = n * t * (carried * grouped + width) * dtype_bytes
        plan.add(f"{GROUP_INPUTS} (width {grouped}, outputs {width})", group, "device")
    points = method.path_points()  # QIG's path, its own or GPTQ's borrowed weighting's
    if points:
        k = points_per_pass(b * t, points)
        # f and f_q each keep about three tensors of the widest width per path point for the backward
        plan.add(f"QIG path batch ({k} points x one chunk, with gradients)", 6 * k * chunk, "device")
    if config.gptq_settings is not None:
        ins = {m.in_features for m in linears(first).values()}
        plan.add("GPTQ Hessians of one layer (float32)", sum(i * i * 4 for i in ins) * 2, "device")
    if getattr(method, "needs_answer_gradients", False):
        plan.add(
            f"MBQ: every layer's input, for its gradient pass ({len(layers)} layers)", len(layers) * stream, "host"
        )


def _place(plan: MemoryPlan, offload: str, device: torch.device) -> None:
    """Move the streams, then the group inputs, to the host in ``plan``, each when :func:`offloads` says so.

    An item moved leaves one chunk's share of it on the device (it comes over one chunk at a time).
    """
    for prefix in OFFLOADABLE:
        key = plan.key(prefix)
        if key is None or not offloads(plan, offload, device):
            continue
        plan.where[key] = "host"
        plan.add(f"{prefix}: one chunk on the device", math.ceil(plan.items[key] * plan.chunk_share), "device")
        plan.notes.append(f"the {prefix} are kept on the host and come to the device one chunk at a time")
    if offload != "none" and plan.device_free is not None and plan.on("device") > DEVICE_SHARE * plan.device_free:
        plan.notes.append(
            "still past the device's share: fewer samples per chunk (--batch-tokens) shrink one chunk's "
            "activations, QIG's path batch and what the offloaded items keep on the device"
        )


def offloads(plan: MemoryPlan, offload: str, device: torch.device) -> bool:
    """Whether what can wait on the host does: "cpu" always, "none" never, "auto" when the device is short.

    On a CPU device "auto" never offloads (the host is the device); "cpu" still does, which copies
    every chunk on each use: the offload path, exercised without a GPU.
    """
    if offload == "cpu":
        return True
    if offload == "none" or device.type == "cpu":
        return False
    return plan.device_free is not None and plan.on("device") > DEVICE_SHARE * plan.device_free


def _outside_bytes(model: torch.nn.Module, family: ModelFamily, count_meta: bool = False) -> int:
    """Bytes of the model outside its decoder layers; tensors on the meta device count only with ``count_meta``."""
    decoder = {id(t) for layer in family.decoder_layers(model) for t in (*layer.parameters(), *layer.buffers())}
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in decoder and id(t) not in seen and (count_meta or t.device.type != "meta"):
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _device_free(device: torch.device) -> int | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
