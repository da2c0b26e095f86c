"""What a model family entry is: its scale groups, where it keeps its decoder layers, how it is saved for serving.

:class:`ScaleGroup`, :class:`KeyRename` and :class:`ModelFamily` are the shapes
of the data in ``qig.models.families``; :func:`get_module` walks a dotted path
with an error that names what is missing; :func:`linears` lists the linears
of a module (a decoder layer, a block) by their paths inside it.

The entries are data: this module and ``qig.models.families`` import torch
only in the functions that look at a model, so ``qig models`` lists the
families without it.

    >>> from qig.models.family import ScaleGroup
    >>> ScaleGroup("mlp_out", prev="mlp.up_proj", linears=("mlp.down_proj",), block="mlp.down_proj").name
    'mlp_out'
    >>> rule = KeyRename(r"^vision_tower\.(?=encoder\.)", "vision_tower.vision_model.")
    >>> rule.apply("vision_tower.encoder.layers.0.mlp.fc1.weight")
    'vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight'
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qig.errors import QigError

if TYPE_CHECKING:  # annotations only
    import torch

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
class KeyRename:
    """One rule of a family's serving key layout: a saved key matching ``pattern`` becomes ``re.sub(pattern, repl)``.

    pattern: a regular expression on the key as ``save_pretrained`` writes it
        (e.g. ``vision_tower.encoder.layers.0.mlp.fc1.weight``); it must not match
        its own output, so applying the rule twice changes nothing.
    """

    pattern: str
    repl: str

    def apply(self, key: str) -> str:
        return re.sub(self.pattern, self.repl, key, count=1)


@dataclass(frozen=True)
class ModelFamily:
    """Where things are in one architecture family; paths are from the top-level model.

    model_types: ``config.model_type`` values this entry serves.
    classes: the transformers model classes it serves (for ``qig models`` and errors).
    layers: the ModuleList of decoder layers to quantize.
    keep_fp: top-level parts that stay in full precision (vision tower, projector,
        embeddings, lm_head): documentation, and a check in the tests.
    image_token_id: the config attribute holding the id of the placeholder token
        whose positions the model fills with image features (calibration's vision role).
    image_token: the placeholder's text, for models whose config has no id for it.
    image_tokens_per_image: config attribute with the fixed number of image tokens
        per image, when the family has one (no tiling, no dynamic resolution).
    adds_between_layers: the model adds something to the hidden states between
        decoder layers, outside them, that does not depend on them (DeepStack); the
        pipeline captures it and replays it.
    layer_returns_tuple: a decoder layer returns ``(hidden_states, ...)`` and the model
        takes element 0 (older remote code); the pipeline's layer stand-ins do the same.
    remote_code: the checkpoints ship their own modelling code (``--trust-remote-code``).
    serving_keys: the serving key layout: renames of the keys ``save_pretrained`` writes, applied to every saved
        folder (fake-quant, export) so that vLLM's loader for the family reads it; transformers reads both.
    ignore: compressed-tensors ``ignore`` entries (``re:`` regexes, matched from the start of a module name as
        compressed-tensors, transformers and vLLM all do) for every linear kept in full precision, in the
        in-memory, the saved and vLLM's module names alike; none of them may match a decoder linear.
    note: one line for ``qig models``.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    groups: tuple[ScaleGroup, ...]
    keep_fp: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    image_token_id: str | None = "image_token_id"
    image_token: str | None = None
    image_tokens_per_image: str | None = None
    adds_between_layers: bool = False
    layer_returns_tuple: bool = False
    remote_code: bool = False
    serving_keys: tuple[KeyRename, ...] = ()
    ignore: tuple[str, ...] = ()
    note: str = ""

    def serving_key(self, key: str) -> str:
        """A saved key in the family's serving layout (the key itself when no rule matches it)."""
        for rule in self.serving_keys:
            key = rule.apply(key)
        return key

    def ignores(self, name: str) -> bool:
        """Whether one of the family's ``ignore`` entries matches the module ``name`` (see :func:`ignore_matches`)."""
        return any(ignore_matches(entry, name) for entry in self.ignore)

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        import torch

        layers = get_module(model, self.layers)
        if not isinstance(layers, torch.nn.ModuleList):
            raise QigError(f"{self.layers} of the {self.name} family is not a ModuleList of decoder layers")
        return layers

    def decoder_linears(self, model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
        """The linears qig quantizes: every Linear of every decoder layer, by path in the model."""
        return {
            f"{self.layers}.{i}.{name}": mod
            for i, layer in enumerate(self.decoder_layers(model))
            for name, mod in linears(layer).items()
        }

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

    def matches(self, model: torch.nn.Module) -> bool:
        """The model's type is one of ours and its first decoder layer has every module our groups name."""
        import torch

        if getattr(getattr(model, "config", None), "model_type", None) not in self.model_types:
            return False
        try:
            layers = model.get_submodule(self.layers)
        except AttributeError:
            return False
        return isinstance(layers, torch.nn.ModuleList) and len(layers) > 0 and has_names(layers[0], self.groups)

    def vision_token_id(self, model: torch.nn.Module, processor=None) -> int | None:
        """Id of the token whose positions get image features: from the config, else the tokenizer."""
        config = getattr(model, "config", None)
        if self.image_token_id is not None:
            value = getattr(config, self.image_token_id, None)
            if value is not None:
                return int(value)
        if self.image_token is not None and processor is not None:
            tok = getattr(processor, "tokenizer", processor)
            tid = tok.convert_tokens_to_ids(self.image_token)
            if tid is not None and tid != tok.unk_token_id:
                return int(tid)
        return None

    def image_seq_length(self, model: torch.nn.Module) -> int | None:
        """Image tokens per image when the family fixes it, else None (tiling, dynamic resolution)."""
        if self.image_tokens_per_image is None:
            return None
        value = getattr(getattr(model, "config", None), self.image_tokens_per_image, None)
        return int(value) if value is not None else None


def ignore_matches(entry: str, name: str) -> bool:
    """compressed-tensors' rule for one ``ignore`` entry: ``re:`` + a regex matched from the start, else the name.

    vLLM (``is_equal_or_regex_match``) and compressed-tensors (``match_name``) both use ``re.match``.

    >>> ignore_matches("re:.*vision_tower.*", "model.vision_tower.encoder.layers.0.mlp.fc1")
    True
    >>> ignore_matches("lm_head", "language_model.lm_head")
    False
    """
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    return entry == name


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """``root.a.b.c`` for ``path='a.b.c'``, with an error naming what is missing."""
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise QigError(f"{type(root).__name__} has no submodule {path!r}; is the model family mapping right?") from exc


def linears(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every linear of ``module`` by its path inside it ("self_attn.q_proj"; "" for a linear itself).

    >>> import torch
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> list(linears(mlp))
    ['0', '2']
    """
    import torch

    return {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def has_names(layer: torch.nn.Module, groups: tuple[ScaleGroup, ...]) -> bool:
    """Whether every path of ``groups`` names a submodule of ``layer``."""
    names = {n for n, _ in layer.named_modules()}
    return all(p in names for g in groups for p in (g.prev, *g.linears, g.block))
