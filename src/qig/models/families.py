"""Per-architecture knowledge, kept as data (STYLE.md rule 6).

A :class:`ModelFamily` says where an LVLM's decoder layers are, which of its
parts stay in full precision, and the scale groups of one decoder layer
(METHOD.md section 3): the previous op whose output channels absorb ``1/s``,
the linears whose input columns absorb ``s``, and the block whose output the
search inspects. Adding a family is one entry in :data:`FAMILIES` plus a
tiny-config test.

    >>> from qig.models import FAMILIES
    >>> [g.name for g in FAMILIES[0].groups]
    ['attn_in', 'attn_out', 'mlp_in', 'mlp_out']
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qig.errors import QigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaleGroup:
    """One scale group of a decoder layer; every path is relative to the layer.

    prev: the op before the linears (a norm, or a linear whose rows are scaled).
    linears: the linears sharing the group's input (their columns are scaled).
    block: the inspected block; its input is the linears' input.
    block_takes_layer_kwargs: the block is called like the layer calls it, with the
        layer's keyword arguments (attention: position embeddings, mask).
    block_output_index: index of the hidden states when the block returns a tuple.
    sublayer_output: the linear whose output is the sub-layer's contribution to the
        residual stream (MBQ measures its gradients there: o_proj / down_proj).
    needs_matching_shapes: skip the group unless prev's and the first linear's
        weights have the same shape (``v -> o`` exists only without GQA, because
        with grouped KV heads one v channel feeds several o columns).
    """

    name: str
    prev: str
    linears: tuple[str, ...]
    block: str
    block_takes_layer_kwargs: bool = False
    block_output_index: int | None = None
    sublayer_output: str = ""
    needs_matching_shapes: bool = False
    prev_offset: float = 0.0  # prev is a norm scaling by (prev_offset + weight): Gemma's RMSNorm uses 1 + w


@dataclass(frozen=True)
class ModelFamily:
    """Where things are in one architecture family; paths are from the top-level model.

    model_types: ``config.model_type`` values this entry serves.
    layers: the ModuleList of decoder layers to quantize.
    keep_fp: top-level parts that stay in full precision (documentation and a check).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    groups: tuple[ScaleGroup, ...]
    keep_fp: tuple[str, ...] = ()
    adds_between_layers: bool = False

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        layers = get_module(model, self.layers)
        if not isinstance(layers, torch.nn.ModuleList):
            raise QigError(f"{self.layers} of the {self.name} family is not a ModuleList of decoder layers")
        return layers

    def active_groups(self, layer: torch.nn.Module) -> list[ScaleGroup]:
        """The groups that apply to this layer (e.g. without ``v -> o`` under GQA)."""
        out = []
        for g in self.groups:
            if g.needs_matching_shapes:
                prev, first = get_module(layer, g.prev), get_module(layer, g.linears[0])
                if prev.weight.shape != first.weight.shape:
                    continue
            out.append(g)
        return out


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """``root.a.b.c`` for ``path='a.b.c'``, with an error naming what is missing."""
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise QigError(f"{type(root).__name__} has no submodule {path!r}; is the model family mapping right?") from exc


# The Llama naming convention, shared by Llama, Qwen2, Mistral and the LMs of
# LLaVA / LLaVA-OneVision / LLaVA-NeXT.
LLAMA_GROUPS = (
    ScaleGroup(
        "attn_in",
        prev="input_layernorm",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        block="self_attn",
        block_takes_layer_kwargs=True,
        block_output_index=0,  # attention returns (hidden_states, attention_weights)
        sublayer_output="self_attn.o_proj",
    ),
    ScaleGroup(
        "attn_out",
        prev="self_attn.v_proj",
        linears=("self_attn.o_proj",),
        block="self_attn.o_proj",
        sublayer_output="self_attn.o_proj",
        needs_matching_shapes=True,
    ),
    ScaleGroup(
        "mlp_in",
        prev="post_attention_layernorm",
        linears=("mlp.gate_proj", "mlp.up_proj"),
        block="mlp",
        sublayer_output="mlp.down_proj",
    ),
    ScaleGroup(
        "mlp_out",
        prev="mlp.up_proj",
        linears=("mlp.down_proj",),
        block="mlp.down_proj",
        sublayer_output="mlp.down_proj",
    ),
)

FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        name="llava",
        model_types=("llava", "llava_onevision", "llava_next"),
        layers="model.language_model.layers",
        groups=LLAMA_GROUPS,
        keep_fp=("model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens", "lm_head"),
    ),
)

# Where a Llama-named decoder may live when the model type is unknown.
_FALLBACK_LAYER_PATHS = ("model.language_model.layers", "language_model.model.layers", "model.layers")


def family_for(model: torch.nn.Module) -> ModelFamily:
    """The family entry for ``model``: by ``config.model_type``, else by the Llama naming convention."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    for path in _FALLBACK_LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and _has_llama_names(layers[0]):
            log.info("model type %r has no family entry; using the Llama naming convention at %s", model_type, path)
            return ModelFamily(name=f"llama-names:{model_type}", model_types=(), layers=path, groups=LLAMA_GROUPS)
    known = ", ".join(t for fam in FAMILIES for t in fam.model_types)
    raise QigError(
        f"model type {model_type!r} is not supported: no family entry and no Llama-named decoder layers at "
        f"{', '.join(_FALLBACK_LAYER_PATHS)}; supported model types: {known}"
    )


def _has_llama_names(layer: torch.nn.Module) -> bool:
    names = {n for n, _ in layer.named_modules()}
    return all(p in names for g in LLAMA_GROUPS for p in (g.prev, *g.linears, g.block))
