"""One scale group's view of a layer: its inputs on both streams, its inspected block, its token-weight stats.

A :class:`~qig.methods.GroupContext` holds everything a method may look at
for one group: the input of the group's linears on x (and on x^q, with the
layer's finished groups quantized), the roles, and ``run_block``, the
inspected block as a function of its input with optional weight overrides.

    >>> ctx = group_context(layer, group, streams.chunks, 0, 0, spec, {}, True)  # doctest: +SKIP
    >>> ctx.run_block(ctx.x[0], 0, None).shape  # doctest: +SKIP
    torch.Size([8, 64, 128])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch.func import functional_call

from qig.calib import ROLE_NAMES
from qig.errors import QigError
from qig.hostmem import HostChunks
from qig.methods import GroupContext
from qig.models import ScaleGroup, get_module, linears
from qig.pipeline.capture import Chunk, input_of
from qig.quant.activation import quantized_activations
from qig.quant.spec import QuantSpec


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


def block_fn(layer: torch.nn.Module, group: ScaleGroup, chunks: list[Chunk], layer_index: int):
    """The group's inspected block as ``run_block(z, chunk index, overrides)`` (see ``qig.methods.base.BlockFn``)."""
    block = get_module(layer, group.block)

    def run_block(z: torch.Tensor, i: int, overrides: dict[str, torch.Tensor] | None) -> torch.Tensor:
        # z: [k*b, T, C] -> [k*b, T, H]
        b = chunks[i].batch
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


def group_inputs(
    layer: torch.nn.Module,
    group: ScaleGroup,
    hidden: Iterable[torch.Tensor],
    chunks: list[Chunk],
    layer_index: int,
    overrides: dict[str, torch.Tensor],
    offload: bool = False,
) -> Sequence[torch.Tensor]:
    """The input of the group's first linear for each chunk's layer input ``hidden``, the layer stopped there.

    hidden may be lazy (a generator): offloaded streams come to the device one chunk at a time.
    offload: each input goes to the host as it is caught (a :class:`~qig.hostmem.HostChunks`).
    """
    first = get_module(layer, group.linears[0])
    caught: list[torch.Tensor] | HostChunks = HostChunks() if offload else []
    for h, c in zip(hidden, chunks, strict=True):
        x = input_of(layer, first, h, c.layer_kwargs[layer_index], overrides)
        if x is not None:
            caught.append(x)
    if len(caught) != len(chunks):
        raise QigError(f"group {group.name}: its first linear {group.linears[0]} was not called by the layer")
    return caught


def group_context(
    layer: torch.nn.Module,
    group: ScaleGroup,
    chunks: list[Chunk],
    layer_index: int,
    search_index: int,
    spec: QuantSpec,
    done: dict[str, torch.Tensor],
    with_quantized_stream: bool,
    act_spec: QuantSpec | None = None,
    offload: bool = False,
) -> GroupContext:
    """Everything a method needs to weight one group's tokens: its inputs on both streams, roles, block.

    done: quantized weights of the layer's finished groups ("path.weight"); on x^q
    they run quantized, with their inputs quantized too in W-A modes (``act_spec``).
    offload: the inputs (and the reference outputs the search keeps) wait on the host
    and come to the device one chunk at a time (``GroupContext.offloaded``).
    """
    with torch.no_grad():
        x_in = group_inputs(layer, group, (c.x for c in chunks), chunks, layer_index, {}, offload)
        xq_in = None
        if with_quantized_stream:
            finished = [get_module(layer, key.removesuffix(".weight")) for key in done]
            with quantized_activations(finished, act_spec):
                xq_in = group_inputs(layer, group, (c.xq for c in chunks), chunks, layer_index, done, offload)
    block = get_module(layer, group.block)
    return GroupContext(
        layer_index=layer_index,
        group=group,
        search_index=search_index,
        x=x_in,
        xq=xq_in,
        roles=[c.roles for c in chunks],
        linears={_relative(p, group.block): get_module(layer, p) for p in group.linears},
        run_block=block_fn(layer, group, chunks, layer_index),
        spec=spec,
        act_spec=act_spec,
        block_linears=linears(block),
        offloaded=offload,
    )


def weight_stats(weights: list[torch.Tensor], roles: list[torch.Tensor]) -> dict:
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
