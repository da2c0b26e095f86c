"""The one layer loop (METHOD.md section 3); searching, applying saved scales and inspecting are its modes.

Per decoder layer, on the compute device: the layer's scale groups in order
(:func:`_visit_group`: the group's inputs, the methods' token weights, a
channel scale found or saved and folded in), then the layer is finished
(:func:`_finish_layer`: x through the FP, folded layer; the mode's
:class:`~qig.pipeline.finish.Finisher` (RTN, GPTQ, or quantizing on the side
only); x^q through the quantized layer). A :class:`Mode` says which of these
steps a run takes; ``qig.pipeline.run`` builds the modes. A
:class:`LoopObserver` sees every layer and group as the loop goes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from qig.dist import current, merged_notes
from qig.methods import GPTQConfig, Method, QuantConfig, SearchResult, search_scales
from qig.methods.clip import search_clip
from qig.models import ModelFamily, ScaleGroup, get_module, linears
from qig.pipeline.capture import Chunk
from qig.pipeline.finish import GPTQ, Finished, Finisher, LayerState, RoundToNearest
from qig.pipeline.groups import group_context, weight_stats
from qig.pipeline.journal import FinishedLayer, Journal
from qig.pipeline.layers import DecoderLayers, InMemoryLayers
from qig.pipeline.result import GroupRecord, InspectedGroup
from qig.pipeline.streams import Streams, cat_rows, every_chunk
from qig.pipeline.timing import Timer
from qig.quant.clip import clip_linear_, clip_weight
from qig.quant.fold import fold_scales_
from qig.quant.spec import QuantSpec, fake_quantize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mode:
    """What the layer loop does at each layer and group.

    label: the progress bar's. spec / act_spec: the weight quantizer, and the
    activation quantizer of W-A modes (None: weight-only). methods: asked for
    token weights at every group looked at (none: the bar counts layers).
    search: ``methods[0]`` finds each group's channel scale, folded before the
    next group (and, with its ``weight_clip``, the group's clip ratios). saved:
    scales to fold instead, ``{(layer, group): s}``; saved_clips: clip ratios to
    apply, ``{(layer, linear path): [out, n_groups]}``.
    finish: what finishes each layer (:mod:`qig.pipeline.finish`: RTN or GPTQ
    in place, or the weights quantized on the side for x^q only, for the token
    weights of ``qig inspect``); None: RTN with ``spec`` and ``act_spec``.
    weighted_hessian: GPTQ's Hessians weighted by ``methods[0]``'s token
    weights. quantized_inputs: group inputs on x^q too.
    looked_at: layers whose groups are looked at (None: all); depth: layers
    visited (None: all). phase: the timing the whole loop counts as, if any.
    offload_inputs: the group inputs and reference outputs wait on the host and
    come to the device one chunk at a time (the memory plan's choice,
    ``qig.pipeline.plan``).
    """

    label: str
    spec: QuantSpec
    act_spec: QuantSpec | None = None
    methods: tuple[Method, ...] = ()
    search: bool = False
    saved: dict[tuple[int, str], torch.Tensor] | None = None
    saved_clips: dict[tuple[int, str], torch.Tensor] | None = None
    finish: Finisher | None = None
    weighted_hessian: bool = False
    quantized_inputs: bool = False
    looked_at: frozenset[int] | None = None
    depth: int | None = None
    phase: str | None = None
    offload_inputs: bool = False

    def __post_init__(self) -> None:
        if self.finish is None:
            object.__setattr__(self, "finish", RoundToNearest(self.spec, self.act_spec))

    @property
    def carried(self) -> tuple[bool, bool]:
        """Whether the mode carries x (for the group inputs) and x^q (for them, or for GPTQ's Hessians)."""
        return bool(self.methods), self.quantized_inputs or self.finish.needs_quantized_stream

    def looks_at(self, layer_index: int) -> bool:
        return bool(self.methods) and (self.looked_at is None or layer_index in self.looked_at)

    def streams(self, chunks: list[Chunk]) -> Streams:
        """The streams this mode carries: x for the group inputs, x^q for them or for GPTQ's Hessians."""
        fp, quantized = self.carried
        return Streams(chunks, fp=fp, quantized=quantized)


def search_mode(config: QuantConfig, method: Method) -> Mode:
    """The calibrated run: token weights (and a search) group by group, then RTN or GPTQ."""
    gptq = config.gptq_settings
    per_group = method.finds_scales or method.weights_tokens  # token weights (and a search) group by group
    use_xq = method.needs_quantized_stream or config.act_spec is not None  # group inputs on x^q too
    return Mode(
        label=f"{config.name} {'search' if method.finds_scales else 'quantize'}",
        spec=config.spec,
        act_spec=config.act_spec,
        methods=(method,) if per_group else (),
        search=method.finds_scales,
        finish=RoundToNearest(config.spec, config.act_spec) if gptq is None else GPTQ(config.spec, gptq),
        # GPTQ's Hessian: with the weights of the group's own method, or plain (every real token 1).
        weighted_hessian=isinstance(config, GPTQConfig) and method.weights_tokens,
        quantized_inputs=use_xq and per_group,
    )


@dataclass
class LoopOutput:
    records: list[GroupRecord | InspectedGroup] = field(default_factory=list)
    quantized: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # "layer.linear" -> params
    gptq_seconds: list[float] = field(default_factory=list)  # the finisher's own seconds, per layer that keeps them


@dataclass
class GroupVisit:
    """One scale group the loop is done with: what it recorded, the scale found (a ``SearchResult``,
    a saved tensor, or None), its seconds, and its seconds per timed phase (group_inputs, token_weights, search)."""

    layer: LayerState
    group: ScaleGroup
    record: GroupRecord | InspectedGroup | None
    found: SearchResult | torch.Tensor | None
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)


class LoopObserver:
    """Hooks into the layer loop, for benchmarks and tools; every hook does nothing unless overridden.

    ``layer_started`` comes before a computed layer's first group (a layer replayed
    from a journal is not computed and has no hooks), ``group_visited`` after each
    group, ``layer_finished`` after the layer's finisher, before x^q goes through it.
    """

    def layer_started(self, layer: LayerState, streams: Streams | None) -> None:
        pass

    def group_visited(self, visit: GroupVisit) -> None:
        pass

    def layer_finished(self, layer: LayerState, finished: Finished) -> None:
        pass


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
    layers: DecoderLayers | None = None,
    journal: Journal | None = None,
    observers: Sequence[LoopObserver] = (),
) -> LoopOutput:
    """Every decoder layer (up to ``mode.depth``) in turn on ``device``: its groups in order, then the layer.

    layers: where the layers come from (default: the model, in memory; a streamed
    model's come from disk). journal: each finished layer is written to it, and the
    layers it already holds are replayed (:func:`_replay`) instead of computed.
    observers: told of every computed layer and group (:class:`LoopObserver`).
    """
    layers = layers if layers is not None else InMemoryLayers(model, family)
    depth = len(layers) if mode.depth is None else min(mode.depth, len(layers))
    replayable = _replayable(journal, depth)
    per_group = bool(mode.methods)  # the bar counts groups, else layers
    groups = [family.active_groups(layers.modules[li]) for li in range(depth)]
    out = LoopOutput()
    search_index = 0
    steps = sum(map(len, groups)) if per_group else depth
    with tqdm(total=steps, desc=mode.label, disable=not progress) as bar, timer(mode.phase):
        for li in range(depth):
            with layers.onload(li, device) as module:
                if li in replayable:
                    bar.set_postfix_str(f"layer {li} from {journal.folder.name}")
                    _replay(mode, journal.load_layer(li, device), module, family, streams, timer, out)
                    bar.update(len(groups[li]) if per_group else 1)
                else:
                    layer = LayerState(li, module)
                    finished = _layer(
                        mode, layer, groups[li], search_index, family, streams, timer, out, bar, observers
                    )
                    if journal is not None and current().main:  # the ranks' layers are the same: rank 0 keeps it
                        with timer("journal"):
                            journal.save_layer(_finished(layer, finished, out))
                    bar.update(int(not per_group))
            search_index += len(groups[li])
    return out


def _layer(mode, layer: LayerState, groups, search_index, family, streams, timer, out, bar, observers) -> Finished:
    """One computed layer: its groups in order (each recorded, each observed), then the layer finished."""
    if mode.quantized_inputs:  # x^q meets the linears no group scales (o_proj under GQA) quantized
        layer.done.update(_ungrouped(layer.module, groups, mode.spec))
    for obs in observers:
        obs.layer_started(layer, streams)
    for offset, group in enumerate(groups):
        bar.set_postfix_str(f"layer {layer.index} {group.name}")
        before = dict(timer.totals)
        with timer(None) as lap:
            visit = _visit_group(mode, layer, group, search_index + offset, streams, timer)
        visit.seconds = lap.seconds
        visit.phases = {k: v - before.get(k, 0.0) for k, v in timer.totals.items() if v != before.get(k)}
        if isinstance(visit.record, GroupRecord):
            visit.record.seconds = lap.seconds
        if visit.record is not None:
            out.records.append(visit.record)
        for obs in observers:
            obs.group_visited(visit)
        bar.update(int(bool(mode.methods)))
    bar.set_postfix_str(f"layer {layer.index} {mode.finish.label}")
    return _finish_layer(mode, layer, family, streams, timer, out, observers)


def _ungrouped(module: torch.nn.Module, groups: list[ScaleGroup], spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The layer's linears in no scale group, quantized as they will be ("path.weight": W), for x^q."""
    grouped = {p for g in groups for p in g.linears}
    return {f"{n}.weight": fake_quantize(m.weight.data, spec) for n, m in linears(module).items() if n not in grouped}


def _replayable(journal: Journal | None, depth: int) -> set[int]:
    """The layers 0..k-1 the journal holds finished (a gap ends the prefix: later ones are redone)."""
    if journal is None:
        return set()
    done, have = set(), set(journal.finished())
    for li in range(depth):
        if li not in have:
            break
        done.add(li)
    if done:
        log.info("resuming: layers 0-%d of %d are replayed from %s", max(done), depth, journal.folder)
    return done


def _finished(layer: LayerState, finished: Finished, out: LoopOutput) -> FinishedLayer:
    """What the journal keeps of ``layer``, just finished."""
    return FinishedLayer(
        index=layer.index,
        state=dict(layer.module.state_dict()),
        quantized={f"{layer.index}.{n}": p for n, p in finished.quantized.items()},
        records=[r for r in out.records if isinstance(r, GroupRecord) and r.layer == layer.index],
        gptq_seconds=finished.seconds,
    )


def _replay(
    mode: Mode,
    saved: FinishedLayer,
    module: torch.nn.Module,
    family: ModelFamily,
    streams: Streams | None,
    timer: Timer,
    out: LoopOutput,
) -> None:
    """A finished layer from the journal: its scales re-folded (x through it), its finished state (x^q through it)."""
    li = saved.index
    groups = {g.name: g for g in family.active_groups(module)}
    for name, s in saved.scales():
        group = groups[name]
        scaled = [get_module(module, p) for p in group.linears]
        fold_scales_(get_module(module, group.prev), scaled, s.to(module_device(module)), offset=group.prev_offset)
    if streams is not None:
        with timer("propagate"):
            streams.advance_fp(module, li)
    module.load_state_dict(saved.state, strict=True)
    mode.finish.replay(module, {k.split(".", 1)[1]: p for k, p in saved.quantized.items()})
    out.records.extend(saved.records)
    out.quantized.update(saved.quantized)
    if saved.gptq_seconds is not None:
        out.gptq_seconds.append(saved.gptq_seconds)
    if streams is not None:
        with timer("propagate"):
            streams.advance_quantized(module, li)


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _visit_group(
    mode: Mode, layer: LayerState, group: ScaleGroup, search_index: int, streams: Streams | None, timer: Timer
) -> GroupVisit:
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
                mode.offload_inputs,
            )
        with timer("token_weights"):
            weights = {m.config.name: m.token_weights(ctx) for m in mode.methods}
    found = _fold(mode, layer, group, ctx, weights, timer)
    if mode.weighted_hessian:
        layer.hessian_weights[group.name] = weights[mode.methods[0].config.name].weights
    if mode.quantized_inputs:  # the finished group runs quantized on x^q for the groups after it
        for p in group.linears:
            w = get_module(layer.module, p).weight.data
            w = clip_weight(w, layer.clips[p], mode.spec) if p in layer.clips else w
            layer.done[f"{p}.weight"] = fake_quantize(w, mode.spec)
    if mode.search:
        log.debug(
            "layer %d %s: r=%.2f loss %.4g -> %.4g",
            layer.index,
            group.name,
            found.ratio,
            found.loss_before,
            found.loss_after,
        )
    return GroupVisit(layer, group, _record(mode, layer.index, group, ctx, weights, found), found)


def _fold(mode: Mode, layer: LayerState, group: ScaleGroup, ctx, weights: dict, timer: Timer):
    """The group's channel scale, found (a ``SearchResult``) or saved (a tensor [C]), folded in; None if none."""
    if mode.search:
        method = mode.methods[0]
        w = weights[method.config.name].weights
        with timer("search"):
            found = method.scales(ctx, w)  # closed form (SmoothQuant), or None: the search
            if found is None:
                c = method.config
                found = search_scales(ctx, w, c.n_grid, c.loss, c.reference_output, c.pad_tokens, c.duo_scaling)
        s = found.scales
    elif mode.saved and (layer.index, group.name) in mode.saved:
        found = s = mode.saved[(layer.index, group.name)]
    else:
        return None
    scaled = [get_module(layer.module, p) for p in group.linears]
    fold_scales_(get_module(layer.module, group.prev), scaled, s, offset=group.prev_offset)
    if mode.search and getattr(mode.methods[0].config, "weight_clip", False):
        with timer("clip"):  # on the folded weights; applied when the layer is finished (_finish_layer)
            ratios = search_clip(ctx, weights[mode.methods[0].config.name].weights, s)
        found.clips = dict(zip(group.linears, ratios.values(), strict=True))
        layer.clips.update(found.clips)
    return found


def _record(mode: Mode, li: int, group: ScaleGroup, ctx, weights: dict, found) -> GroupRecord | InspectedGroup | None:
    """What the result keeps of one group: its token weights per method (inspect), its search, or its saved scale."""
    if not mode.finish.quantizes:  # inspecting: every method's weights, nothing searched
        if not weights:
            return None
        rows = {name: cat_rows(every_chunk(tw.weights)) for name, tw in weights.items()}
        notes = {name: merged_notes(tw.notes) for name, tw in weights.items()}
        return InspectedGroup(layer=li, group=group.name, weights=rows, notes=notes)
    if weights:
        (tw,) = weights.values()
        searched = found if mode.search else None
        rows, roles = every_chunk(tw.weights), every_chunk(ctx.roles)  # every rank's chunks, in global order
        return GroupRecord(
            layer=li,
            group=group.name,
            scales=searched.scales.float().cpu() if searched else None,
            clips=searched.clips if searched else {},
            ratio=searched.ratio if searched else None,
            loss_before=searched.loss_before if searched else None,
            loss_after=searched.loss_after if searched else None,
            token_weights=cat_rows(rows),
            weight_stats=weight_stats(rows, roles),
            notes=merged_notes(tw.notes),
        )
    if found is not None:  # a saved scale, applied (with its saved clip ratios)
        clips = {p: r for (at, p), r in (mode.saved_clips or {}).items() if at == li and p in group.linears}
        return GroupRecord(layer=li, group=group.name, scales=found.float().cpu(), clips=clips)
    return None


def _finish_layer(
    mode: Mode,
    layer: LayerState,
    family: ModelFamily,
    streams: Streams | None,
    timer: Timer,
    out: LoopOutput,
    observers: Sequence[LoopObserver] = (),
) -> Finished:
    """x through the FP (folded) layer; the mode's finisher; x^q through the finished layer."""
    if streams is not None:
        with timer("propagate"):
            streams.advance_fp(layer.module, layer.index)
    if mode.saved_clips:
        layer.clips.update({p: r for (li, p), r in mode.saved_clips.items() if li == layer.index})
    for path, ratios in layer.clips.items():  # after x went through the FP layer: the clamp is part of quantizing
        clip_linear_(get_module(layer.module, path), ratios, mode.spec)
    finished = mode.finish.apply(layer, family, streams, timer)
    out.quantized.update({f"{layer.index}.{n}": p for n, p in finished.quantized.items()})
    if finished.seconds is not None:
        out.gptq_seconds.append(finished.seconds)
        log.debug("layer %d: %s in %.2fs", layer.index, mode.finish.label, finished.seconds)
    for obs in observers:
        obs.layer_finished(layer, finished)
    if streams is not None:
        with timer("propagate"):
            streams.advance_quantized(layer.module, layer.index, finished.xq_weights)
    return finished
