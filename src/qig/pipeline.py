"""The layer-wise pipeline (METHOD.md section 3), written once for every method.

1. Capture the inputs of every decoder layer's first call (hidden states of
   layer 0, and each layer's keyword arguments: position embeddings, masks) by
   running the model with the layers swapped for catchers.
2. Decoder layers in order, one at a time on the compute device. Per scale
   group: the group's input on the FP stream x (and on the quantized stream
   x^q when the method needs it), the method's token weights, the shared
   search, then the fold (a transform that keeps the FP function).
3. Quantize the layer's linears (RTN with the shared quantizer), then push x
   through the FP layer and x^q through the quantized one.

    >>> result = run_layerwise(model, AWQConfig(wbits=3), calib, device="cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from qig.calib import ROLE_NAMES, CalibrationSet
from qig.errors import QigError
from qig.methods import GroupContext, QuantConfig, method_for, search_scales
from qig.methods.config import SearchConfig
from qig.models import ModelFamily, ScaleGroup, family_for, get_module
from qig.quant.fold import fold_scales_
from qig.quant.rtn import rtn_
from qig.quant.spec import fake_quantize

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


@dataclass
class Chunk:
    """One calibration batch as it moves through the decoder.

    x / xq: [b, T, C] inputs of the current layer on the FP / quantized stream
    (the same tensor until they diverge). layer_kwargs: per layer, the keyword
    arguments the model passes to it. roles: [b, T].
    """

    x: torch.Tensor
    xq: torch.Tensor | None
    roles: torch.Tensor
    layer_kwargs: list[dict]


@dataclass
class GroupRecord:
    """What the search found for one group; token_weights: [N, T] (pad = 0)."""

    layer: int
    group: str
    scales: torch.Tensor
    ratio: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    token_weights: torch.Tensor | None = None
    weight_stats: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class LayerwiseResult:
    groups: list[GroupRecord]
    timings: dict[str, float]
    method_summary: dict
    roles: torch.Tensor | None  # [N, T] int8


class _Catcher(torch.nn.Module):
    """Stands in for a decoder layer during capture: records its call, passes hidden states on."""

    def __init__(self, index: int, last: bool, sink: dict) -> None:
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise QigError("decoder layers called with extra positional arguments are not supported yet")
        self.sink.setdefault("hidden", hidden_states)
        self.sink.setdefault("kwargs", []).append(kwargs)
        if self.last:
            raise _StopForward
        return hidden_states


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters do not require grad for the duration (QIG and MBQ differentiate activations only)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def capture(
    model: torch.nn.Module, family: ModelFamily, calib: CalibrationSet, batch_size: int, device: torch.device
) -> list[Chunk]:
    """Inputs of layer 0 and every layer's keyword arguments, per calibration batch, on ``device``."""
    layers = family.decoder_layers(model)
    originals = list(layers)
    home = next(model.parameters()).device
    chunks = []
    try:
        for i in range(len(layers)):
            layers[i] = _Catcher(i, i == len(layers) - 1, {})
        model.to(device)  # everything but the decoder layers, which are out of the tree now
        for batch in calib.batches(batch_size):
            sink: dict = {}
            for c in layers:
                c.sink = sink
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            try:
                model(**inputs, use_cache=False)
            except _StopForward:
                pass
            if "hidden" not in sink:
                raise QigError("the model never called its first decoder layer; is the family mapping right?")
            kwargs = [_plain_kwargs(kw) for kw in sink["kwargs"]]
            x = sink["hidden"]
            chunks.append(Chunk(x=x, xq=x, roles=batch.roles.to(device), layer_kwargs=kwargs))
    finally:
        model.to(home)
        for i, layer in enumerate(originals):
            layers[i] = layer
    return chunks


def _plain_kwargs(kwargs: dict) -> dict:
    # No KV cache while calibrating: every layer call is a fresh full-sequence call.
    out = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
    out["use_cache"] = False
    return out


def _expand_batch(obj, b: int, k: int):
    """Repeat tensors whose first dim is the chunk's batch ``b`` k times along it (path points of QIG)."""
    if k == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.repeat(k, *([1] * (obj.dim() - 1))) if obj.dim() and obj.shape[0] == b else obj
    if isinstance(obj, tuple | list):
        return type(obj)(_expand_batch(o, b, k) for o in obj)
    if isinstance(obj, dict):
        return {key: _expand_batch(v, b, k) for key, v in obj.items()}
    return obj


def _relative(path: str, prefix: str) -> str:
    if path == prefix:
        return ""
    if not path.startswith(prefix + "."):
        raise QigError(f"linear {path} is not inside its group's block {prefix}; fix the family mapping")
    return path[len(prefix) + 1 :]


def _param_name(key: str) -> str:
    return f"{key}.weight" if key else "weight"


def _block_fn(layer: torch.nn.Module, group: ScaleGroup, chunks: list[Chunk], layer_index: int):
    block = get_module(layer, group.block)

    def run_block(z: torch.Tensor, i: int, overrides: dict[str, torch.Tensor] | None) -> torch.Tensor:
        # z: [k*b, T, C] -> [k*b, T, H]
        b = chunks[i].x.shape[0]
        kwargs = {}
        if group.block_takes_layer_kwargs:
            kwargs = _expand_batch(chunks[i].layer_kwargs[layer_index], b, z.shape[0] // b)
        if overrides:
            params = {_param_name(k): w for k, w in overrides.items()}
            out = functional_call(block, params, (z,), kwargs, strict=False)
        else:
            out = block(z, **kwargs)
        return out[group.block_output_index] if group.block_output_index is not None else out

    return run_block


def _group_inputs(
    layer: torch.nn.Module,
    group: ScaleGroup,
    streams: list[torch.Tensor],
    chunks: list[Chunk],
    layer_index: int,
    overrides: dict[str, torch.Tensor],
) -> list[torch.Tensor]:
    """The input of the group's first linear for each chunk, stopping the layer right there."""
    first = get_module(layer, group.linears[0])
    caught: list[torch.Tensor] = []

    def hook(_module, args):
        caught.append(args[0])
        raise _StopForward

    handle = first.register_forward_pre_hook(hook)
    try:
        for h, c in zip(streams, chunks, strict=True):
            try:
                if overrides:
                    functional_call(layer, overrides, (h,), c.layer_kwargs[layer_index], strict=False)
                else:
                    layer(h, **c.layer_kwargs[layer_index])
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(caught) != len(chunks):
        raise QigError(f"group {group.name}: its first linear {group.linears[0]} was not called by the layer")
    return caught


def _layer_linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def _weight_stats(weights: list[torch.Tensor], roles: list[torch.Tensor]) -> dict:
    """Share of the total weight per role, and the weight per token of each role (mean)."""
    w = torch.cat([x.float().flatten().cpu() for x in weights])
    r = torch.cat([x.flatten().cpu() for x in roles])
    total = float(w.sum()) or 1.0
    stats = {}
    for code, name in ROLE_NAMES.items():
        sel = r == code
        if code == 0 or not sel.any():
            continue
        stats[f"mass_{name}"] = float(w[sel].sum()) / total
        stats[f"mean_{name}"] = float(w[sel].mean())
    return stats


def _pad_rows(ws: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.float().cpu() for w in ws], dim=0)  # every chunk has the same T


def run_layerwise(
    model: torch.nn.Module,
    config: QuantConfig,
    calib: CalibrationSet | None,
    device: str | torch.device = "cpu",
    scales: dict[tuple[int, str], torch.Tensor] | None = None,
    progress: bool = True,
) -> LayerwiseResult:
    """Quantize ``model``'s decoder layers in place; return what the search found.

    With ``scales`` (``{(layer, group): s}``) the search is skipped: those scales
    are folded and the layers quantized, without calibration data.
    """
    device = torch.device(device)
    family = family_for(model)
    method = method_for(config)
    spec = config.spec
    timings: dict[str, float] = defaultdict(float)
    layers = family.decoder_layers(model)
    for lin_name, lin in ((f"layer 0 {n}", m) for n, m in _layer_linears(layers[0]).items()):
        spec.check(lin.in_features, lin_name)

    if scales is not None or not method.searches:
        return _apply_without_search(model, family, spec, scales or {}, device, progress, timings)
    if calib is None:
        raise QigError(f"{config.name} needs calibration data; pass calib (e.g. qig.calib.embedded_calibration)")
    assert isinstance(config, SearchConfig)

    with frozen(model):
        t = time.perf_counter()
        method.prepare(model, family, calib, device)
        timings["prepare"] += time.perf_counter() - t

        t = time.perf_counter()
        chunks = capture(model, family, calib, config.batch_size, device)
        timings["capture"] += time.perf_counter() - t

        records: list[GroupRecord] = []
        search_index = 0
        n_steps = sum(len(family.active_groups(layer)) for layer in layers)
        bar = tqdm(total=n_steps, desc=f"{config.name} search", disable=not progress)
        home = next(layers[0].parameters()).device
        for li, layer in enumerate(layers):
            layer.to(device)
            done: dict[str, torch.Tensor] = {}  # quantized weights of this layer's finished groups
            for group in family.active_groups(layer):
                bar.set_postfix_str(f"layer {li} {group.name}")
                t0 = time.perf_counter()
                with torch.no_grad():
                    x_in = _group_inputs(layer, group, [c.x for c in chunks], chunks, li, {})
                    xq_in = None
                    if method.needs_quantized_stream:
                        xq_in = _group_inputs(layer, group, [c.xq for c in chunks], chunks, li, done)
                timings["group_inputs"] += time.perf_counter() - t0
                ctx = GroupContext(
                    layer_index=li,
                    group=group,
                    search_index=search_index,
                    x=x_in,
                    xq=xq_in,
                    roles=[c.roles for c in chunks],
                    linears={_relative(p, group.block): get_module(layer, p) for p in group.linears},
                    run_block=_block_fn(layer, group, chunks, li),
                    spec=spec,
                )
                t1 = time.perf_counter()
                tw = method.token_weights(ctx)
                timings["token_weights"] += time.perf_counter() - t1
                t1 = time.perf_counter()
                found = search_scales(ctx, tw.weights, config.n_grid, config.loss)
                timings["search"] += time.perf_counter() - t1
                fold_scales_(get_module(layer, group.prev), [get_module(layer, p) for p in group.linears], found.scales)
                if method.needs_quantized_stream:
                    for p in group.linears:
                        done[f"{p}.weight"] = fake_quantize(get_module(layer, p).weight.data, spec)
                records.append(
                    GroupRecord(
                        layer=li,
                        group=group.name,
                        scales=found.scales.float().cpu(),
                        ratio=found.ratio,
                        loss_before=found.loss_before,
                        loss_after=found.loss_after,
                        token_weights=_pad_rows(tw.weights),
                        weight_stats=_weight_stats(tw.weights, ctx.roles),
                        notes=tw.notes,
                        seconds=time.perf_counter() - t0,
                    )
                )
                log.debug(
                    "layer %d %s: r=%.2f loss %.4g -> %.4g",
                    li,
                    group.name,
                    found.ratio,
                    found.loss_before,
                    found.loss_after,
                )
                search_index += 1
                bar.update(1)
                del x_in, xq_in, ctx
            t = time.perf_counter()
            with torch.no_grad():
                for c in chunks:
                    c.x = layer(c.x, **c.layer_kwargs[li])  # the FP layer (folded: same function)
                    if not method.needs_quantized_stream:
                        c.xq = None
                rtn_(_layer_linears(layer), spec)
                if method.needs_quantized_stream:
                    for c in chunks:
                        c.xq = layer(c.xq, **c.layer_kwargs[li])  # the quantized layer
            timings["propagate"] += time.perf_counter() - t
            layer.to(home)
        bar.close()
        roles = _pad_rows([c.roles for c in chunks]).to(torch.int8)
        del chunks
    return LayerwiseResult(groups=records, timings=dict(timings), method_summary=method.summary(), roles=roles)


@torch.no_grad()
def _apply_without_search(model, family, spec, scales, device, progress, timings) -> LayerwiseResult:
    layers = family.decoder_layers(model)
    records = []
    known = {(li, g.name) for li, layer in enumerate(layers) for g in family.active_groups(layer)}
    unknown = set(scales) - known
    if unknown:
        names = ", ".join(f"layer {li} {g}" for li, g in sorted(unknown))
        raise QigError(f"saved scales name groups this model does not have: {names}")
    home = next(layers[0].parameters()).device
    t = time.perf_counter()
    for li, layer in enumerate(tqdm(layers, desc="quantize", disable=not progress)):
        layer.to(device)
        for group in family.active_groups(layer):
            s = scales.get((li, group.name))
            if s is None:
                continue
            fold_scales_(get_module(layer, group.prev), [get_module(layer, p) for p in group.linears], s.to(device))
            records.append(GroupRecord(layer=li, group=group.name, scales=s.float().cpu()))
        rtn_(_layer_linears(layer), spec)
        layer.to(home)
    timings["quantize"] = time.perf_counter() - t
    return LayerwiseResult(groups=records, timings=dict(timings), method_summary={}, roles=None)
