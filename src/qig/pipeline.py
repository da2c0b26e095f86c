"""The layer-wise pipeline (METHOD.md section 3), written once for every method.

1. Capture the inputs of every decoder layer's first call (hidden states of
   layer 0, and each layer's keyword arguments: position embeddings, masks) by
   running the model with the layers swapped for catchers.
2. Decoder layers in order, one at a time on the compute device. Per scale
   group: the group's input on the FP stream x (and on the quantized stream
   x^q when the method needs it), the method's token weights, the shared
   search, then the fold (a transform that keeps the FP function).
3. Push x through the FP (folded) layer, quantize the layer's linears with
   the shared quantizer, by RTN or by GPTQ (``config.gptq_settings``; its
   Hessians from x^q, see :func:`gptq_layer_`), then push x^q through the
   quantized layer.

Weight-activation modes (``config.act_spec`` set) always carry x^q: the
finished layers run with quantized weights and per-token activation
quantizers on their linears (installed for good, see
:func:`install_activation_quantizers`), the finished groups of the current
layer likewise, and the search scores candidates on x^q against f(x).

    >>> result = run_layerwise(model, AWQConfig(wbits=3), calib, device="cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from qig.calib import PAD, ROLE_NAMES, CalibrationSet
from qig.errors import QigError
from qig.methods import GPTQConfig, GroupContext, QuantConfig, SearchConfig, method_for, search_scales
from qig.models import ModelFamily, ScaleGroup, family_for, get_module
from qig.quant.activation import (
    activation_spec_of,
    install_activation_quantizer_,
    quantized_activations,
    remove_activation_quantizer_,
)
from qig.quant.fold import fold_scales_
from qig.quant.gptq import GPTQSettings, Hessian, gptq_quantize, normalize_token_weights
from qig.quant.rtn import rtn_
from qig.quant.spec import QuantSpec, fake_quantize

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


@dataclass
class Chunk:
    """One calibration batch as it moves through the decoder.

    x / xq: [b, T, C] inputs of the current layer on the FP / quantized stream
    (the same tensor until they diverge). layer_kwargs: per layer, the keyword
    arguments the model passes to it. roles: [b, T]. injections: per layer
    index, what the model adds to the hidden states after that layer, outside
    the decoder layers ([b, T, C]; Qwen3-VL's DeepStack features), replayed by
    :func:`next_input`.
    """

    x: torch.Tensor
    xq: torch.Tensor | None
    roles: torch.Tensor
    layer_kwargs: list[dict]
    injections: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class GroupRecord:
    """What the search found for one group; token_weights: [N, T] (pad = 0)."""

    layer: int
    group: str
    scales: torch.Tensor | None  # None: token weights only (GPTQ with a weighted Hessian), no search
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
    # GPTQ's quantizer parameters per "layer.linear": scale, zero [out, n_groups], g_idx [in] under act-order
    quantized: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


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
            raise _StopForward
        return (hidden_states,) if self.as_tuple else hidden_states


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
            layers[i] = _Catcher(i, i == len(layers) - 1, {}, family.layer_returns_tuple)
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
            injections = _between_layers(sink["inputs"], family)
            chunks.append(Chunk(x=x, xq=x, roles=batch.roles.to(device), layer_kwargs=kwargs, injections=injections))
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


def next_input(layer: torch.nn.Module, h: torch.Tensor, chunk: Chunk, layer_index: int, params=None) -> torch.Tensor:
    """The next layer's input: ``layer(h)`` (with weight overrides ``params``) plus what the model adds after it."""
    kwargs = chunk.layer_kwargs[layer_index]
    out = layer(h, **kwargs) if params is None else functional_call(layer, params, (h,), kwargs, strict=False)
    if isinstance(out, tuple):  # remote-code layers (InternLM2) return (hidden_states, ...)
        out = out[0]
    extra = chunk.injections.get(layer_index)
    return out if extra is None else out + extra


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


def _group_context(
    layer: torch.nn.Module,
    group: ScaleGroup,
    chunks: list[Chunk],
    layer_index: int,
    search_index: int,
    spec,
    done: dict[str, torch.Tensor],
    with_quantized_stream: bool,
    act_spec: QuantSpec | None = None,
) -> GroupContext:
    """Everything a method needs to weight one group's tokens: its inputs on both streams, roles, block.

    done: quantized weights of the layer's finished groups ("path.weight"); on x^q
    they run quantized, with their inputs quantized too in W-A modes (``act_spec``).
    """
    with torch.no_grad():
        x_in = _group_inputs(layer, group, [c.x for c in chunks], chunks, layer_index, {})
        xq_in = None
        if with_quantized_stream:
            finished = [get_module(layer, key.removesuffix(".weight")) for key in done]
            with quantized_activations(finished, act_spec):
                xq_in = _group_inputs(layer, group, [c.xq for c in chunks], chunks, layer_index, done)
    return GroupContext(
        layer_index=layer_index,
        group=group,
        search_index=search_index,
        x=x_in,
        xq=xq_in,
        roles=[c.roles for c in chunks],
        linears={_relative(p, group.block): get_module(layer, p) for p in group.linears},
        run_block=_block_fn(layer, group, chunks, layer_index),
        spec=spec,
        act_spec=act_spec,
    )


def _layer_linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def _decoder_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linears the weight quantizer touches: every linear of every decoder layer the family lists."""
    return list(family_for(model).decoder_linears(model).values())


def install_activation_quantizers(model: torch.nn.Module, act_spec: QuantSpec) -> int:
    """Quantize the inputs of the decoder linears per token at run time (a W-A model); returns how many.

    >>> install_activation_quantizers(model, activation_spec(8))  # doctest: +SKIP
    42
    """
    linears = _decoder_linears(model)
    for lin in linears:
        install_activation_quantizer_(lin, act_spec)
    return len(linears)


def remove_activation_quantizers(model: torch.nn.Module) -> int:
    """Remove every qig activation quantizer from the model's modules; returns how many were removed."""
    return sum(remove_activation_quantizer_(m) for m in model.modules())


def activation_quantization(model: torch.nn.Module) -> tuple[QuantSpec, int] | None:
    """The activation quantizer installed in the model and on how many modules, or None.

    Any model works (no family entry needed): every module is looked at, though
    qig only ever installs them on the decoder linears.
    """
    specs = [s for s in map(activation_spec_of, model.modules()) if s is not None]
    return (specs[0], len(specs)) if specs else None


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
    are folded and the layers quantized with RTN, without calibration data.
    With ``config.gptq_settings`` set the layers are quantized by GPTQ (see
    :func:`gptq_layer_`) instead of RTN.
    """
    device = torch.device(device)
    family = family_for(model)
    method = method_for(config)
    spec = config.spec
    act_spec = config.act_spec  # W-A modes: per-token activation quantizer; None: weight-only
    gptq = config.gptq_settings
    timings: dict[str, float] = defaultdict(float)
    layers = family.decoder_layers(model)
    for lin_name, lin in ((f"layer 0 {n}", m) for n, m in _layer_linears(layers[0]).items()):
        spec.check(lin.in_features, lin_name)
    if activation_quantization(model) is not None:
        raise QigError(
            "the model already quantizes its activations (it is a W-A quantized model); quantize a fresh FP "
            "model (load it again), or call qig.pipeline.remove_activation_quantizers first"
        )

    if scales is not None and gptq is not None:
        raise QigError(
            f"saved scales are re-applied with round-to-nearest, but {config.name} quantizes with GPTQ, which "
            "needs calibration data; re-run the search with the GPTQ quantizer, or apply the scales with RTN"
        )
    if scales is not None or not (method.finds_scales or gptq is not None):
        return _apply_without_search(model, family, spec, act_spec, scales or {}, device, progress, timings)
    if calib is None:
        raise QigError(f"{config.name} needs calibration data; pass calib (e.g. qig.calib.embedded_calibration)")

    per_group = method.finds_scales or method.weights_tokens  # token weights (and a search) group by group
    use_xq = method.needs_quantized_stream or act_spec is not None  # group inputs on x^q too
    keep_xq = use_xq or gptq is not None
    # GPTQ's Hessian: with the weights of the group's own method, or plain (every real token 1).
    weighted_hessian = isinstance(config, GPTQConfig) and method.weights_tokens
    with frozen(model):
        t = time.perf_counter()
        method.progress = progress
        method.prepare(model, family, calib, device)
        timings["prepare"] += time.perf_counter() - t

        t = time.perf_counter()
        chunks = capture(model, family, calib, config.batch_size, device)
        timings["capture"] += time.perf_counter() - t

        records: list[GroupRecord] = []
        quantized: dict[str, dict[str, torch.Tensor]] = {}
        gptq_seconds: list[float] = []
        search_index = 0
        n_steps = sum(len(family.active_groups(layer)) for layer in layers) if per_group else len(layers)
        desc = f"{config.name} {'search' if method.finds_scales else 'quantize'}"
        bar = tqdm(total=n_steps, desc=desc, disable=not progress)
        home = next(layers[0].parameters()).device
        for li, layer in enumerate(layers):
            layer.to(device)
            done: dict[str, torch.Tensor] = {}  # quantized weights of this layer's finished groups
            hessian_weights: dict[str, list[torch.Tensor]] = {}  # group -> per chunk [b, T]
            for group in family.active_groups(layer) if per_group else ():
                bar.set_postfix_str(f"layer {li} {group.name}")
                t0 = time.perf_counter()
                ctx = _group_context(layer, group, chunks, li, search_index, spec, done, use_xq, act_spec)
                timings["group_inputs"] += time.perf_counter() - t0
                t1 = time.perf_counter()
                tw = method.token_weights(ctx)
                timings["token_weights"] += time.perf_counter() - t1
                if weighted_hessian:
                    hessian_weights[group.name] = tw.weights
                found = None
                if method.finds_scales:
                    t1 = time.perf_counter()
                    found = method.scales(ctx, tw.weights)  # closed form (SmoothQuant), or None: the search
                    if found is None:
                        found = search_scales(ctx, tw.weights, config.n_grid, config.loss, config.reference_output)
                    timings["search"] += time.perf_counter() - t1
                    fold_scales_(
                        get_module(layer, group.prev),
                        [get_module(layer, p) for p in group.linears],
                        found.scales,
                        offset=group.prev_offset,
                    )
                if use_xq:
                    for p in group.linears:
                        done[f"{p}.weight"] = fake_quantize(get_module(layer, p).weight.data, spec)
                records.append(
                    GroupRecord(
                        layer=li,
                        group=group.name,
                        scales=found.scales.float().cpu() if found else None,
                        ratio=found.ratio if found else None,
                        loss_before=found.loss_before if found else None,
                        loss_after=found.loss_after if found else None,
                        token_weights=_pad_rows(tw.weights),
                        weight_stats=_weight_stats(tw.weights, ctx.roles),
                        notes=tw.notes,
                        seconds=time.perf_counter() - t0,
                    )
                )
                if found:
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
                del ctx
            t = time.perf_counter()
            with torch.no_grad():
                for c in chunks:
                    c.x = next_input(layer, c.x, c, li) if per_group else None  # the FP layer (folded)
                    if not keep_xq:
                        c.xq = None
            timings["propagate"] += time.perf_counter() - t
            if gptq is None:
                rtn_(_layer_linears(layer), spec)
                if act_spec is not None:
                    for lin in _layer_linears(layer).values():
                        install_activation_quantizer_(lin, act_spec)
            else:
                bar.set_postfix_str(f"layer {li} gptq")
                t = time.perf_counter()
                results = gptq_layer_(layer, family, chunks, li, spec, gptq, hessian_weights)
                gptq_seconds.append(time.perf_counter() - t)
                timings["gptq"] += gptq_seconds[-1]
                quantized.update({f"{li}.{name}": r for name, r in results.items()})
                log.debug("layer %d: GPTQ in %.2fs", li, gptq_seconds[-1])
            t = time.perf_counter()
            with torch.no_grad():
                if keep_xq:
                    for c in chunks:
                        c.xq = next_input(layer, c.xq, c, li)  # the quantized layer
            timings["propagate"] += time.perf_counter() - t
            if not per_group:
                bar.update(1)
            layer.to(home)
        bar.close()
        roles = _pad_rows([c.roles for c in chunks]).to(torch.int8)
        del chunks
    summary = method.summary()
    if gptq is not None:
        summary = {**summary, "gptq": {**dataclasses.asdict(gptq), "seconds_per_layer": gptq_seconds}}
    return LayerwiseResult(
        groups=records, timings=dict(timings), method_summary=summary, roles=roles, quantized=quantized
    )


def _hessian_source(name: str, groups: list[ScaleGroup]) -> str | None:
    """The group whose token weights weight linear ``name``'s Hessian.

    Its own group when it is one of a group's linears; otherwise the group whose
    inspected block holds it (o_proj under GQA, where no v -> o group exists:
    the attention group, whose block is the whole self-attention); None if none.
    """
    for g in groups:
        if name in g.linears:
            return g.name
    holders = [g for g in groups if g.block and name.startswith(g.block + ".")]
    return max(holders, key=lambda g: len(g.block)).name if holders else None


def _sequential_stages(layer: torch.nn.Module, chunk: Chunk, layer_index: int) -> list[list[str]]:
    """The layer's linears in call order, those called on the same input tensor together ([q, k, v], [o], ...)."""
    linears = _layer_linears(layer)
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=n: calls.append((n, args[0]))) for n, m in linears.items()
    ]
    try:
        with torch.no_grad():
            layer(chunk.xq, **chunk.layer_kwargs[layer_index])
    finally:
        for h in handles:
            h.remove()
    names = [n for n, _ in calls]
    twice = sorted({n for n in names if names.count(n) > 1})
    never = sorted(set(linears) - set(names))
    if twice or never:
        raise QigError(
            f"layer {layer_index}: GPTQ needs every linear called once per forward; "
            + (f"called more than once: {', '.join(twice)}; " if twice else "")
            + (f"never called: {', '.join(never)}" if never else "")
        )
    stages: list[list[str]] = []
    previous = None
    for n, x in calls:
        if previous is not None and x is previous:
            stages[-1].append(n)
        else:
            stages.append([n])
        previous = x
    return stages


def _stage_hessians(
    layer: torch.nn.Module,
    first: torch.nn.Linear,
    chunks: list[Chunk],
    layer_index: int,
    sources: set[str | None],
    weights: dict[str, list[torch.Tensor]],
) -> dict[str | None, Hessian]:
    """One Hessian per weight source (None = plain) from the input of ``first``, the layer stopped right there."""
    hessians = {s: Hessian(first.in_features, chunks[0].xq.device) for s in sources}
    for i, c in enumerate(chunks):
        real = c.roles != PAD  # [b, T]
        try:
            _raise_input_of(layer, first, c, layer_index)
        except _Caught as caught:
            for source, h in hessians.items():
                h.add(caught.x, real.float() if source is None else weights[source][i], real=real)  # x: [b, T, C]
    return hessians


class _Caught(Exception):
    """Carries a linear's input out of a forward pass stopped there."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = x


def _raise_input_of(layer: torch.nn.Module, first: torch.nn.Module, chunk: Chunk, layer_index: int) -> None:
    def hook(_module, args):
        raise _Caught(args[0])

    handle = first.register_forward_pre_hook(hook)
    try:
        layer(chunk.xq, **chunk.layer_kwargs[layer_index])
    finally:
        handle.remove()
    raise QigError(f"layer {layer_index}: a linear GPTQ quantizes was not called by the layer")


@torch.no_grad()
def gptq_layer_(
    layer: torch.nn.Module,
    family: ModelFamily,
    chunks: list[Chunk],
    layer_index: int,
    spec: QuantSpec,
    settings: GPTQSettings,
    group_weights: dict[str, list[torch.Tensor]],
) -> dict[str, dict[str, torch.Tensor]]:
    """GPTQ every linear of ``layer`` in place, sub-layer by sub-layer; return each one's scale / zero / g_idx.

    Which inputs feed the Hessian: those the linear sees at quantization time,
    the standard sequential GPTQ setting. The layer's scales are already folded;
    its input is the quantized stream x^q (the layers below quantized); the
    linears run in call order in stages of those sharing one input ([q, k, v],
    [o], [gate, up], [down]), and each stage's Hessian is taken with the
    earlier stages already GPTQ-quantized. Pad tokens never count.

    group_weights: per group name, token weights per chunk [b, T] (pad = 0);
    a linear whose group is absent (or all, when empty) gets the plain Hessian.
    """
    linears = _layer_linears(layer)
    groups = family.active_groups(layer)
    normalized = {g: normalize_token_weights(ws) for g, ws in group_weights.items()}
    results: dict[str, dict[str, torch.Tensor]] = {}
    for stage in _sequential_stages(layer, chunks[0], layer_index):
        sources = {n: _hessian_source(n, groups) if group_weights else None for n in stage}
        sources = {n: s if s in normalized else None for n, s in sources.items()}
        hessians = _stage_hessians(layer, linears[stage[0]], chunks, layer_index, set(sources.values()), normalized)
        for n in stage:
            r = gptq_quantize(linears[n].weight.data, hessians[sources[n]], spec, settings)
            linears[n].weight.copy_(r.weight)
            results[n] = {"scale": r.scale.cpu(), "zero": r.zero.cpu()}
            if r.g_idx is not None:
                results[n]["g_idx"] = r.g_idx.cpu()
            if r.dead:
                log.info("layer %d %s: %d dead input channel(s) in the GPTQ Hessian", layer_index, n, r.dead)
    return results


@torch.no_grad()
def _apply_without_search(model, family, spec, act_spec, scales, device, progress, timings) -> LayerwiseResult:
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
            prev, linears = get_module(layer, group.prev), [get_module(layer, p) for p in group.linears]
            fold_scales_(prev, linears, s.to(device), offset=group.prev_offset)
            records.append(GroupRecord(layer=li, group=group.name, scales=s.float().cpu()))
        rtn_(_layer_linears(layer), spec)
        if act_spec is not None:
            for lin in _layer_linears(layer).values():
                install_activation_quantizer_(lin, act_spec)
        layer.to(home)
    timings["quantize"] = time.perf_counter() - t
    return LayerwiseResult(groups=records, timings=dict(timings), method_summary={}, roles=None)


@dataclass
class InspectedGroup:
    """Token weights of one group under several methods, without any search: method name -> [N, T]."""

    layer: int
    group: str
    weights: dict[str, torch.Tensor]
    notes: dict[str, dict] = field(default_factory=dict)


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
    methods = [method_for(c) for c in configs]
    decoder = family.decoder_layers(model)
    wanted = set(layers)
    if not wanted or min(wanted) < 0 or max(wanted) >= len(decoder):
        raise QigError(f"layers {sorted(wanted)} are not all in 0..{len(decoder) - 1}, the model's decoder layers")
    out: list[InspectedGroup] = []
    with frozen(model):
        for m in methods:
            m.progress = progress
            m.prepare(model, family, calib, device)
        chunks = capture(model, family, calib, configs[0].batch_size, device)
        home = next(decoder[0].parameters()).device
        search_index = 0
        for li, layer in enumerate(tqdm(decoder[: max(wanted) + 1], desc="token weights", disable=not progress)):
            layer.to(device)
            quantized = {f"{n}.weight": fake_quantize(m.weight.data, spec) for n, m in _layer_linears(layer).items()}
            done: dict[str, torch.Tensor] = {}  # quantized weights of this layer's earlier groups
            for group in family.active_groups(layer):
                if li in wanted:
                    ctx = _group_context(layer, group, chunks, li, search_index, spec, done, True)
                    record = InspectedGroup(layer=li, group=group.name, weights={})
                    for m in methods:
                        tw = m.token_weights(ctx)
                        record.weights[m.config.name] = _pad_rows(tw.weights)
                        record.notes[m.config.name] = tw.notes
                    out.append(record)
                for p in group.linears:
                    done[f"{p}.weight"] = quantized[f"{p}.weight"]
                search_index += 1
            with torch.no_grad():
                for c in chunks:
                    c.xq = next_input(layer, c.xq, c, li, quantized)
                    c.x = next_input(layer, c.x, c, li)
            layer.to(home)
    return out, {m.config.name: m.summary() for m in methods}
