"""The pipeline's entry points: :func:`run_layerwise` (search or apply) and :func:`collect_token_weights`.

Each turns its arguments into a :class:`~qig.pipeline.loop.Mode` of the one
layer loop, captures the calibration inputs when the mode needs streams, and
runs the loop. Before any work, a model whose decoder weights hold NaN or inf
and saved scales that do not fit the model are refused.

    >>> result = run_layerwise(model, AWQConfig(wbits=3), calib, device="cpu")  # doctest: +SKIP
    >>> groups, summaries = collect_token_weights(model, [QIGConfig(wbits=3)], calib, [0, 5])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from qig.calib import CalibrationSet
from qig.errors import QigError
from qig.methods import QuantConfig, SearchConfig, method_for
from qig.models import ModelFamily, family_for, get_module, linears
from qig.models.checkpoint import STREAMED
from qig.pipeline.capture import capture
from qig.pipeline.finish import LookOnly
from qig.pipeline.finite import check_decoder_weights
from qig.pipeline.gradients import prepare_methods
from qig.pipeline.journal import Journal, JournalIndex
from qig.pipeline.layers import layers_for
from qig.pipeline.loop import LoopObserver, Mode, frozen, layer_loop, search_mode
from qig.pipeline.plan import GROUP_INPUTS, STREAMS, memory_plan
from qig.pipeline.result import InspectedGroup, QuantizationResult
from qig.pipeline.timing import Timer
from qig.quant.activation import activation_quantization
from qig.quant.clip import clip_weight
from qig.quant.fold import check_scale

log = logging.getLogger(__name__)


def run_layerwise(
    model: torch.nn.Module,
    config: QuantConfig,
    calib: CalibrationSet | None,
    device: str | torch.device = "cpu",
    scales: dict[tuple[int, str], torch.Tensor] | None = None,
    clips: dict[tuple[int, str], torch.Tensor] | None = None,
    progress: bool = True,
    journal: Journal | None = None,
    offload_streams: str = "auto",
    observers: Sequence[LoopObserver] = (),
) -> QuantizationResult:
    """Quantize ``model``'s decoder layers in place; return what the search found and the quantized state.

    journal: every finished layer is written to it, and the layers it holds are
    replayed, not recomputed (resume). A model streamed from disk (``decoder="disk"``)
    needs one: its finished layers live there, and the model reads them from it
    afterwards. offload_streams: "auto", "cpu" or "none": whether the calibration streams and the search's
    group inputs wait on the host (:mod:`qig.pipeline.plan`).
    observers: see every computed layer and group (:class:`~qig.pipeline.loop.LoopObserver`).

    With ``scales`` (``{(layer, group): s}``) the search is skipped: those scales
    are folded and the layers quantized with RTN, without calibration data; ``clips``
    (``{(layer, linear path): ratios [out, n_groups]}``) clamps those linears first.
    With ``config.gptq_settings`` set the layers are quantized by GPTQ (see
    :func:`~qig.pipeline.gptq.gptq_layer_`) instead of RTN.

        >>> result = run_layerwise(model, AWQConfig(wbits=3), calib, device="cpu")  # doctest: +SKIP
    """
    device = torch.device(device)
    family = family_for(model)
    method = method_for(config)
    _refuse(model, family, config, scales)
    layers = layers_for(model, family)
    if layers.streamed and journal is None:
        raise QigError(
            "the model's decoder layers are streamed from disk, so its finished layers need a work folder; "
            "pass work_dir= (a folder with room for the quantized model)"
        )
    timer = Timer()
    if scales is not None or not method.needs_calibration:
        mode = _apply_mode(model, family, config, scales or {}, clips or {})
        with frozen(model):
            out = layer_loop(model, family, mode, None, device, timer, progress, layers, journal, observers)
        _keep_streamed(model, layers, journal, family)
        return QuantizationResult(config=config, groups=out.records, timings=timer.totals, quantized=out.quantized)
    if calib is None:
        raise QigError(f"{config.name} needs calibration data; pass calib (e.g. qig.calib.calibration_for)")
    mode = search_mode(config, method)
    plan = memory_plan(model, family, layers, calib, config, method, device, mode.carried, offload_streams)
    log.info("%s", plan.describe())
    offload = plan.on_host(STREAMS)
    mode = dataclasses.replace(mode, offload_inputs=plan.on_host(GROUP_INPUTS))
    with frozen(model):
        with timer("prepare"):
            prepare_methods(model, family, [method], calib, layers, device, progress)
        with timer("capture"):
            chunks = capture(model, family, calib, config.samples_per_batch(calib.seq_len), device, offload)
            streams = mode.streams(chunks)
        out = layer_loop(model, family, mode, streams, device, timer, progress, layers, journal, observers)
        roles = streams.roles()
        del streams, chunks
    _keep_streamed(model, layers, journal, family)
    return _searched(config, method, out, roles, timer, plan)


def _searched(config, method, out, roles, timer, plan) -> QuantizationResult:
    """The result of a calibrated run: the loop's records and quantized state, the method's summary, the plan."""
    summary = method.summary()
    if config.gptq_settings is not None:
        gptq = dataclasses.asdict(config.gptq_settings)
        summary = {**summary, "gptq": {**gptq, "seconds_per_layer": out.gptq_seconds}}
    return QuantizationResult(
        config=config,
        groups=out.records,
        timings=timer.totals,
        method_summary=summary,
        roles=roles,
        quantized=out.quantized,
        memory_plan=plan.items,
    )


def _keep_streamed(model, layers, journal: Journal | None, family: ModelFamily) -> None:
    """A streamed model reads its layers from the journal from now on: they are the quantized ones."""
    if layers.streamed:
        setattr(model, STREAMED, JournalIndex(journal.folder, family.layers))


def _refuse(model: torch.nn.Module, family: ModelFamily, config: QuantConfig, scales) -> None:
    """Refuse a group size the linears do not take, a model already W-A quantized, saved scales under GPTQ.

    And a model whose decoder linears hold NaN or inf (a corrupt checkpoint), before any work.
    """
    check_decoder_weights(model, family)
    for name, lin in linears(family.decoder_layers(model)[0]).items():
        config.spec.check(lin.in_features, f"layer 0 {name}")
    if activation_quantization(model) is not None:
        raise QigError(
            "the model already quantizes its activations (it is a W-A quantized model); quantize a fresh FP "
            "model (load it again), or call qig.quant.activation.remove_activation_quantizers first"
        )
    if scales is not None and config.gptq_settings is not None:
        raise QigError(
            f"saved scales are re-applied with round-to-nearest, but {config.name} quantizes with GPTQ, which "
            "needs calibration data; re-run the search with the GPTQ quantizer, or apply the scales with RTN"
        )


def _apply_mode(
    model,
    family: ModelFamily,
    config: QuantConfig,
    scales: dict[tuple[int, str], torch.Tensor],
    clips: dict[tuple[int, str], torch.Tensor] | None = None,
) -> Mode:
    """Saved scales folded, then RTN: no calibration, no streams (also plain RTN, with no scales).

    Every scale is checked before the first layer: its group exists, it is finite and
    positive, and it has one entry per input channel of the group's linears.
    """
    layers = family.decoder_layers(model)
    known = {(li, g.name): g for li, layer in enumerate(layers) for g in family.active_groups(layer)}
    unknown = set(scales) - set(known)
    if unknown:
        names = ", ".join(f"layer {li} {g}" for li, g in sorted(unknown))
        raise QigError(f"saved scales name groups this model does not have: {names}")
    for (li, name), s in sorted(scales.items()):
        check_scale(s, li, name, "saved scales: ")
        channels = get_module(layers[li], known[(li, name)].linears[0]).in_features
        if s.numel() != channels:
            raise QigError(
                f"saved scales for layer {li} {name} have {s.numel()} channels, but the group's linears take "
                f"{channels} inputs; they were found for another model, "
                "pass the search.safetensors of a run on this model"
            )
    for (li, path), ratios in sorted((clips or {}).items()):
        if li >= len(layers) or path not in linears(layers[li]):
            raise QigError(f"saved clip ratios name layer {li} {path}, a linear this model does not have")
        lin = linears(layers[li])[path]
        clip_weight(lin.weight.data[:1], ratios[:1], config.spec)  # refuses a shape from another group size
        if ratios.shape[0] != lin.out_features:
            raise QigError(
                f"saved clip ratios for layer {li} {path} have {ratios.shape[0]} rows, but the linear has "
                f"{lin.out_features} outputs; pass the search.safetensors of a run on this model"
            )
    return Mode(
        label="quantize",
        spec=config.spec,
        act_spec=config.act_spec,
        saved=scales,
        saved_clips=clips or None,
        phase="quantize",
    )


def collect_token_weights(
    model: torch.nn.Module,
    configs: list[SearchConfig],
    calib: CalibrationSet,
    layers: list[int],
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[list[InspectedGroup], dict[str, dict]]:
    """Every method's token weights for every group of ``layers``; the model is left untouched.

    The same streams as :func:`run_layerwise`, without search or fold: x^q goes
    through the RTN-quantized layers below (weights quantized on the side,
    never written into the model), so it is the stream QIG would see if no
    scale were found. Layers past the deepest one asked for are not visited.
    Returns the groups in order and each method's ``summary()`` (MBQ's rho).

        >>> groups, _ = collect_token_weights(model, [QIGConfig(wbits=3)], calib, [0, 5])  # doctest: +SKIP
    """
    device = torch.device(device)
    family = family_for(model)
    spec = configs[0].spec
    if any(c.spec != spec for c in configs):
        raise QigError("every method compared must use the same quantizer; give them the same wbits and group size")
    methods = tuple(method_for(c) for c in configs)
    check_decoder_weights(model, family)
    n_layers = len(family.decoder_layers(model))
    wanted = frozenset(layers)
    if not wanted or min(wanted) < 0 or max(wanted) >= n_layers:
        raise QigError(f"layers {sorted(wanted)} are not all in 0..{n_layers - 1}, the model's decoder layers")
    mode = Mode(
        label="token weights",
        spec=spec,
        methods=methods,
        finish=LookOnly(spec),
        quantized_inputs=True,
        looked_at=wanted,
        depth=max(wanted) + 1,
    )
    layers = layers_for(model, family)
    with frozen(model):
        prepare_methods(model, family, list(methods), calib, layers, device, progress)
        batch = configs[0].samples_per_batch(calib.seq_len)
        streams = mode.streams(capture(model, family, calib, batch, device))
        out = layer_loop(model, family, mode, streams, device, Timer(), progress, layers)
    return out.records, {m.config.name: m.summary() for m in methods}
