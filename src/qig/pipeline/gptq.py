"""GPTQ of a whole decoder layer, sub-layer by sub-layer (the staging around ``qig.quant.gptq``).

The linears run in call order in stages of those sharing one input ([q, k, v],
[o], [gate, up], [down]); each stage's Hessians come from its input on the
quantized stream x^q with the earlier stages already GPTQ-quantized. A token-
weighted Hessian (QIG-weighted GPTQ) takes each linear's weights from the
group it belongs to, or whose inspected block holds it.

    >>> params = gptq_layer_(layer, family, chunks, 0, spec, GPTQSettings(), {})  # doctest: +SKIP
    >>> sorted(params["self_attn.q_proj"])  # doctest: +SKIP
    ['scale', 'zero']
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from qig.calib import PAD
from qig.dist import broadcast_tensor, current, gather, ordered
from qig.errors import QigError
from qig.models import ModelFamily, ScaleGroup, linears
from qig.pipeline.capture import Chunk, input_of
from qig.quant.gptq import GPTQSettings, Hessian, HessianPart, gptq_quantize, normalize_token_weights
from qig.quant.spec import QuantSpec

log = logging.getLogger(__name__)


def hessian_source(name: str, groups: list[ScaleGroup]) -> str | None:
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


def sequential_stages(layer: torch.nn.Module, chunk: Chunk, layer_index: int) -> list[list[str]]:
    """The layer's linears in call order, those called on the same input tensor together ([q, k, v], [o], ...)."""
    by_name = linears(layer)
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=n: calls.append((n, args[0]))) for n, m in by_name.items()
    ]
    try:
        with torch.no_grad():
            layer(chunk.xq, **chunk.layer_kwargs[layer_index])
    finally:
        for h in handles:
            h.remove()
    names = [n for n, _ in calls]
    twice = sorted({n for n in names if names.count(n) > 1})
    never = sorted(set(by_name) - set(names))
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
    """One Hessian per weight source (None = plain) from the input of ``first``, the layer stopped right there.

    One process adds each chunk's part as it comes (one [C, C] part alive at a time); several
    keep their parts until every rank's are exchanged in chunk order. The same parts are added
    in the same order either way.
    """
    hessians = {s: Hessian(first.in_features, chunks[0].device) for s in sources}
    parts: dict[str | None, list[HessianPart]] = {s: [] for s in sources}
    alone = current().size == 1
    for i, c in enumerate(chunks):
        real = c.roles != PAD  # [b, T]
        x = input_of(layer, first, c.xq, c.layer_kwargs[layer_index])  # [b, T, C]
        if x is None:
            raise QigError(f"layer {layer_index}: a linear GPTQ quantizes was not called by the layer")
        for source, h in hessians.items():
            w = real.float() if source is None else weights[source][i]
            part = h.part(x, w, real=real)
            if alone:
                h.accumulate(part)
            else:
                parts[source].append(part)
        del x
    if alone:
        return hessians
    for source, h in hessians.items():
        for part in _in_chunk_order(parts.pop(source), first.in_features, chunks[0].device):
            h.accumulate(part)
    return hessians


def _in_chunk_order(parts: list[HessianPart], n: int, device: torch.device) -> Iterator[HessianPart]:
    """Every rank's Hessian parts in global chunk order: each part broadcast by the rank that computed it.

    Every rank then runs the single process's running mean over the same parts in
    the same order, so H is the single process's bits. Each rank computes the
    [C, C] products of its own chunks (the costly part) before any is sent.
    """
    ranks = current()
    meta = ordered([(p.m, p.tokens, p.live.cpu()) for p in parts])
    mine = iter(parts)
    for k, (m, tokens, live) in enumerate(meta):
        owner = k % ranks.size
        own = next(mine) if owner == ranks.rank else None
        A = None
        if m != 0.0:
            A = broadcast_tensor(own.A if own is not None else torch.empty(n, n, device=device), owner)
        yield HessianPart(A, m, live.to(device), tokens)


def _top(weights: list[torch.Tensor]) -> float:
    """The largest token weight over every rank's chunks (this rank's alone for one process)."""
    return max(gather(max((float(w.max()) for w in weights), default=0.0)))


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
    by_name = linears(layer)
    groups = family.active_groups(layer)
    normalized = {g: normalize_token_weights(ws, _top(ws)) for g, ws in group_weights.items()}
    results: dict[str, dict[str, torch.Tensor]] = {}
    for stage in sequential_stages(layer, chunks[0], layer_index):
        sources = {n: hessian_source(n, groups) if group_weights else None for n in stage}
        sources = {n: s if s in normalized else None for n, s in sources.items()}
        hessians = _stage_hessians(layer, by_name[stage[0]], chunks, layer_index, set(sources.values()), normalized)
        ranks = current()
        solved = {}
        for j, n in enumerate(stage):  # weight-parallel: linear j of the stage is solved by rank j % N
            if j % ranks.size != ranks.rank:
                continue
            r = gptq_quantize(by_name[n].weight.data, hessians[sources[n]], spec, settings)
            solved[n] = {"weight": r.weight.cpu(), "scale": r.scale.cpu(), "zero": r.zero.cpu()}
            if r.g_idx is not None:
                solved[n]["g_idx"] = r.g_idx.cpu()
            if r.global_scale is not None:
                solved[n]["global_scale"] = r.global_scale.cpu()
            if r.dead:
                log.info("layer %d %s: %d dead input channel(s) in the GPTQ Hessian", layer_index, n, r.dead)
        if ranks.size > 1:  # every rank takes every solved linear (one exchange per stage, in rank order)
            solved = {n: found for part in gather(solved) for n, found in part.items()}
        for n in stage:
            found = solved[n]
            by_name[n].weight.copy_(found.pop("weight"))
            results[n] = found
    return results
