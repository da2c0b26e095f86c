"""The one layer loop (METHOD.md section 3); searching, applying saved scales and inspecting are its modes.

Per decoder layer, on the compute device: the layer's scale groups in order
(:func:`_visit_group`: the group's inputs, the methods' token weights, a
channel scale found or saved and folded in), then the layer is finished
(:func:`_finish_layer`: x through the FP, folded layer; the layer quantized
by RTN or GPTQ, keeping the quantizer's parameters, or quantized on the side
only; x^q through the quantized layer). A :class:`Mode` says which of these
steps a run takes; ``qig.pipeline.run`` builds the modes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from qig.methods import Method, search_scales
from qig.models import ModelFamily, ScaleGroup, get_module
from qig.pipeline.capture import Chunk
from qig.pipeline.gptq import gptq_layer_
from qig.pipeline.groups import group_context, layer_linears, weight_stats
from qig.pipeline.result import GroupRecord, InspectedGroup
from qig.pipeline.streams import Streams, cat_rows
from qig.pipeline.timing import Timer
from qig.quant.activation import install_activation_quantizers
from qig.quant.fold import fold_scales_
from qig.quant.gptq import GPTQSettings
from qig.quant.rtn import rtn_
from qig.quant.spec import QuantSpec, fake_quantize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mode:
    """What the layer loop does at each layer and group.

    label: the progress bar's. spec / act_spec: the weight quantizer, and the
    activation quantizer of W-A modes (None: weight-only). methods: asked for
    token weights at every group looked at (none: the bar counts layers).
    search: ``methods[0]`` finds each group's channel scale, folded before the
    next group. saved: scales to fold instead, ``{(layer, group): s}``.
    quantizer: "rtn" or "gptq" quantize each finished layer in place (W-A:
    activation quantizers installed), "side" leaves the model untouched and
    quantizes the weights for x^q only (the token weights of ``qig inspect``).
    gptq / weighted_hessian: GPTQ's settings, its Hessians weighted by
    ``methods[0]``'s token weights. quantized_inputs: group inputs on x^q too.
    looked_at: layers whose groups are looked at (None: all); depth: layers
    visited (None: all). phase: the timing the whole loop counts as, if any.
    """

    label: str
    spec: QuantSpec
    act_spec: QuantSpec | None = None
    methods: tuple[Method, ...] = ()
    search: bool = False
    saved: dict[tuple[int, str], torch.Tensor] | None = None
    quantizer: str = "rtn"
    gptq: GPTQSettings | None = None
    weighted_hessian: bool = False
    quantized_inputs: bool = False
    looked_at: frozenset[int] | None = None
    depth: int | None = None
    phase: str | None = None

    def looks_at(self, layer_index: int) -> bool:
        return bool(self.methods) and (self.looked_at is None or layer_index in self.looked_at)

    def streams(self, chunks: list[Chunk]) -> Streams:
        """The streams this mode carries: x for the group inputs, x^q for them or for GPTQ's Hessians."""
        return Streams(chunks, fp=bool(self.methods), quantized=self.quantized_inputs or self.quantizer == "gptq")


@dataclass
class LayerState:
    """One decoder layer while the loop is on it."""

    index: int
    module: torch.nn.Module
    done: dict[str, torch.Tensor] = field(default_factory=dict)  # "path.weight": finished groups, quantized
    hessian_weights: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # group -> per chunk [b, T]


@dataclass
class LoopOutput:
    records: list[GroupRecord | InspectedGroup] = field(default_factory=list)
    quantized: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # "layer.linear" -> params
    gptq_seconds: list[float] = field(default_factory=list)


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


def layer_loop(
    model: torch.nn.Module,
    family: ModelFamily,
    mode: Mode,
    streams: Streams | None,
    device: torch.device,
    timer: Timer,
    progress: bool = True,
) -> LoopOutput:
    """Every decoder layer (up to ``mode.depth``) in turn on ``device``: its groups in order, then the layer."""
    layers = list(family.decoder_layers(model))[: mode.depth]
    home = next(layers[0].parameters()).device
    per_group = bool(mode.methods)  # the bar counts groups, else layers
    steps = sum(len(family.active_groups(m)) for m in layers) if per_group else len(layers)
    out = LoopOutput()
    search_index = 0
    with tqdm(total=steps, desc=mode.label, disable=not progress) as bar, timer(mode.phase):
        for li, module in enumerate(layers):
            module.to(device)
            layer = LayerState(li, module)
            for group in family.active_groups(module):
                bar.set_postfix_str(f"layer {li} {group.name}")
                with timer(None) as lap:
                    record = _visit_group(mode, layer, group, search_index, streams, timer)
                if isinstance(record, GroupRecord):
                    record.seconds = lap.seconds
                if record is not None:
                    out.records.append(record)
                search_index += 1
                bar.update(int(per_group))
            bar.set_postfix_str(f"layer {li} {mode.quantizer}")
            _finish_layer(mode, layer, family, streams, timer, out)
            bar.update(int(not per_group))
            module.to(home)
    return out


def _visit_group(
    mode: Mode, layer: LayerState, group: ScaleGroup, search_index: int, streams: Streams | None, timer: Timer
) -> GroupRecord | InspectedGroup | None:
    """One scale group: its inputs, every method's token weights, its scale folded in; what to record."""
    ctx, weights = None, {}
    if mode.looks_at(layer.index):
        with timer("group_inputs"):
            ctx = group_context(
                layer.module,
                group,
                streams.chunks,
                layer.index,
                search_index,
                mode.spec,
                layer.done,
                mode.quantized_inputs,
                mode.act_spec,
            )
        with timer("token_weights"):
            weights = {m.config.name: m.token_weights(ctx) for m in mode.methods}
    found = _fold(mode, layer, group, ctx, weights, timer)
    if mode.weighted_hessian:
        layer.hessian_weights[group.name] = weights[mode.methods[0].config.name].weights
    if mode.quantized_inputs:  # the finished group runs quantized on x^q for the groups after it
        for p in group.linears:
            layer.done[f"{p}.weight"] = fake_quantize(get_module(layer.module, p).weight.data, mode.spec)
    if mode.search:
        log.debug(
            "layer %d %s: r=%.2f loss %.4g -> %.4g",
            layer.index,
            group.name,
            found.ratio,
            found.loss_before,
            found.loss_after,
        )
    return _record(mode, layer.index, group, ctx, weights, found)


def _fold(mode: Mode, layer: LayerState, group: ScaleGroup, ctx, weights: dict, timer: Timer):
    """The group's channel scale, found (a ``SearchResult``) or saved (a tensor [C]), folded in; None if none."""
    if mode.search:
        method = mode.methods[0]
        w = weights[method.config.name].weights
        with timer("search"):
            found = method.scales(ctx, w)  # closed form (SmoothQuant), or None: the search
            if found is None:
                c = method.config
                found = search_scales(ctx, w, c.n_grid, c.loss, c.reference_output)
        s = found.scales
    elif mode.saved and (layer.index, group.name) in mode.saved:
        found = s = mode.saved[(layer.index, group.name)]
    else:
        return None
    linears = [get_module(layer.module, p) for p in group.linears]
    fold_scales_(get_module(layer.module, group.prev), linears, s, offset=group.prev_offset)
    return found


def _record(mode: Mode, li: int, group: ScaleGroup, ctx, weights: dict, found) -> GroupRecord | InspectedGroup | None:
    """What the result keeps of one group: its token weights per method (inspect), its search, or its saved scale."""
    if mode.quantizer == "side":  # inspecting: every method's weights, nothing searched
        if not weights:
            return None
        rows = {name: cat_rows(tw.weights) for name, tw in weights.items()}
        notes = {name: tw.notes for name, tw in weights.items()}
        return InspectedGroup(layer=li, group=group.name, weights=rows, notes=notes)
    if weights:
        (tw,) = weights.values()
        searched = found if mode.search else None
        return GroupRecord(
            layer=li,
            group=group.name,
            scales=searched.scales.float().cpu() if searched else None,
            ratio=searched.ratio if searched else None,
            loss_before=searched.loss_before if searched else None,
            loss_after=searched.loss_after if searched else None,
            token_weights=cat_rows(tw.weights),
            weight_stats=weight_stats(tw.weights, ctx.roles),
            notes=tw.notes,
        )
    if found is not None:  # a saved scale, applied
        return GroupRecord(layer=li, group=group.name, scales=found.float().cpu())
    return None


def _finish_layer(
    mode: Mode, layer: LayerState, family: ModelFamily, streams: Streams | None, timer: Timer, out: LoopOutput
) -> None:
    """x through the FP (folded) layer; the layer quantized, its parameters kept; x^q through the quantized layer."""
    li, module = layer.index, layer.module
    if streams is not None:
        with timer("propagate"):
            streams.advance_fp(module, li)
    params = None  # weight overrides for x^q ("side": the model itself is not quantized)
    if mode.quantizer == "rtn":
        out.quantized.update({f"{li}.{n}": p for n, p in rtn_(layer_linears(module), mode.spec).items()})
        if mode.act_spec is not None:
            install_activation_quantizers(layer_linears(module).values(), mode.act_spec)
    elif mode.quantizer == "gptq":
        with timer("gptq") as lap:
            found = gptq_layer_(module, family, streams.chunks, li, mode.spec, mode.gptq, layer.hessian_weights)
        out.quantized.update({f"{li}.{n}": p for n, p in found.items()})
        out.gptq_seconds.append(lap.seconds)
        log.debug("layer %d: GPTQ in %.2fs", li, lap.seconds)
    else:  # "side": the finished groups' quantized weights, and the other linears' (o_proj under GQA)
        params = {f"{n}.weight": m.weight.data for n, m in layer_linears(module).items()}
        params = {k: layer.done[k] if k in layer.done else fake_quantize(w, mode.spec) for k, w in params.items()}
    if streams is not None:
        with timer("propagate"):
            streams.advance_quantized(module, li, params)
