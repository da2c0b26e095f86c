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

import dataclasses
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
    note: str = ""

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        layers = get_module(model, self.layers)
        if not isinstance(layers, torch.nn.ModuleList):
            raise QigError(f"{self.layers} of the {self.name} family is not a ModuleList of decoder layers")
        return layers

    def decoder_linears(self, model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
        """The linears qig quantizes: every Linear of every decoder layer, by path in the model."""
        return {
            f"{self.layers}.{i}.{name}": mod
            for i, layer in enumerate(self.decoder_layers(model))
            for name, mod in layer.named_modules()
            if isinstance(mod, torch.nn.Linear)
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
        if getattr(getattr(model, "config", None), "model_type", None) not in self.model_types:
            return False
        try:
            layers = model.get_submodule(self.layers)
        except AttributeError:
            return False
        return isinstance(layers, torch.nn.ModuleList) and len(layers) > 0 and _has_names(layers[0], self.groups)

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

# Gemma 3 (METHOD.md section 3 mapped onto its layer): four norms per layer. input_layernorm
# feeds q/k/v and pre_feedforward_layernorm feeds gate/up, so they take the 1/s; the
# post_attention / post_feedforward norms normalise the sub-layers' outputs before the
# residual add and absorb nothing. Every Gemma RMSNorm multiplies by (1 + w), hence the
# offset. Gemma 3 4B and up use GQA (no v -> o); the group stays for MHA variants.
GEMMA3_GROUPS = (
    dataclasses.replace(LLAMA_GROUPS[0], prev_offset=1.0),
    LLAMA_GROUPS[1],
    dataclasses.replace(LLAMA_GROUPS[2], prev="pre_feedforward_layernorm", prev_offset=1.0),
    LLAMA_GROUPS[3],
)

# InternLM2 (the LM of InternVL2-2B/8B/26B, remote code): q/k/v are one fused linear
# `attention.wqkv` and the MLP is w1 (gate), w3 (up), w2 (down). attention_norm -> wqkv
# scales wqkv's input columns, which is exact for a fused linear. No v -> o group: the v
# rows of wqkv are interleaved with q and k per KV head group, and these models use GQA,
# where the group does not exist anyway.
INTERNLM2_GROUPS = (
    ScaleGroup(
        "attn_in",
        prev="attention_norm",
        linears=("attention.wqkv",),
        block="attention",
        block_takes_layer_kwargs=True,
        block_output_index=0,  # (hidden_states, attention_weights, past_key_value)
        sublayer_output="attention.wo",
    ),
    ScaleGroup(
        "mlp_in",
        prev="ffn_norm",
        linears=("feed_forward.w1", "feed_forward.w3"),
        block="feed_forward",
        sublayer_output="feed_forward.w2",
    ),
    ScaleGroup(
        "mlp_out",
        prev="feed_forward.w3",
        linears=("feed_forward.w2",),
        block="feed_forward.w2",
        sublayer_output="feed_forward.w2",
    ),
)

_LLAVA_FP = ("model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens", "lm_head")
_QWEN_FP = ("model.visual", "model.language_model.embed_tokens", "lm_head")
_IDEFICS_FP = ("model.vision_model", "model.connector", "model.text_model.embed_tokens", "lm_head")

FAMILIES: tuple[ModelFamily, ...] = (
    # LLaVA-1.5 (CLIP + Vicuna/Llama, multi-head attention: the v -> o group exists) and
    # every LlavaForConditionalGeneration (the embedded model: SigLIP + Qwen2 with GQA).
    # A fixed number of image tokens per image.
    ModelFamily(
        name="llava",
        model_types=("llava",),
        classes=("LlavaForConditionalGeneration",),
        layers="model.language_model.layers",
        groups=LLAMA_GROUPS,
        keep_fp=_LLAVA_FP,
        image_tokens_per_image="image_seq_length",
        note="LLaVA-1.5 and other LLaVA checkpoints (Llama, Vicuna, Qwen2 LMs)",
    ),
    # LLaVA-NeXT: anyres tiling, so the image-token count follows each image's size.
    ModelFamily(
        name="llava-next",
        model_types=("llava_next",),
        classes=("LlavaNextForConditionalGeneration",),
        layers="model.language_model.layers",
        groups=LLAMA_GROUPS,
        keep_fp=_LLAVA_FP,
        note="anyres tiling (Vicuna, Mistral, Llama-3 LMs)",
    ),
    # LLaVA-OneVision (the QIG paper's LLaVA-OV-7B): SigLIP + Qwen2 with GQA, anyres_max tiling.
    ModelFamily(
        name="llava-onevision",
        model_types=("llava_onevision",),
        classes=("LlavaOnevisionForConditionalGeneration",),
        layers="model.language_model.layers",
        groups=LLAMA_GROUPS,
        keep_fp=_LLAVA_FP,
        note="the QIG paper's LLaVA-OV; Qwen2 LM with GQA",
    ),
    # Qwen2-VL / Qwen2.5-VL: Qwen2-named decoder with q/k/v biases (folding scales only the
    # columns, biases stay). M-RoPE: the model computes 3D (temporal, height, width) position
    # ids from the image grids and turns them into the rotary position embeddings it passes to
    # every layer; the pipeline replays those captured layer kwargs, so positions stay right.
    ModelFamily(
        name="qwen2-vl",
        model_types=("qwen2_vl",),
        classes=("Qwen2VLForConditionalGeneration",),
        layers="model.language_model.layers",
        groups=LLAMA_GROUPS,
        keep_fp=_QWEN_FP,
        note="the QIG paper's Qwen2-VL; dynamic resolution, M-RoPE",
    ),
    ModelFamily(
        name="qwen2.5-vl",
        model_types=("qwen2_5_vl",),
        classes=("Qwen2_5_VLForConditionalGeneration",),
        layers="model.language_model.layers",
        groups=LLAMA_GROUPS,
        keep_fp=_QWEN_FP,
        note="dynamic resolution, M-RoPE, windowed-attention ViT",
    ),
    # Qwen3-VL (dense): Qwen3 layers (q_norm / k_norm inside attention act per head after
    # the projections, so the groups are Llama's) with interleaved M-RoPE. DeepStack adds
    # projected features of intermediate ViT layers to the vision positions of the hidden
    # states after the first decoder layers, outside the layers: declared here, captured and
    # replayed by the pipeline. The MoE variant (qwen3_vl_moe) is not supported.
    ModelFamily(
        name="qwen3-vl",
        model_types=("qwen3_vl",),
        classes=("Qwen3VLForConditionalGeneration",),
        layers="model.language_model.layers",
        groups=LLAMA_GROUPS,
        keep_fp=_QWEN_FP,
        adds_between_layers=True,
        note="dense models; DeepStack features replayed between layers",
    ),
    # InternVL, HF-native (InternVL2.5/3 "-hf" checkpoints): InternViT + pixel-shuffle MLP
    # projector + a Qwen2 or Llama LM; dynamic tiling with a thumbnail.
    ModelFamily(
        name="internvl",
        model_types=("internvl",),
        classes=("InternVLForConditionalGeneration",),
        layers="model.language_model.layers",
        groups=LLAMA_GROUPS,
        keep_fp=_LLAVA_FP,
        note="HF-native InternVL (Qwen2 / Llama LMs); tiles + thumbnail",
    ),
    # InternVL2 with its original remote code and an InternLM2 LM (the QIG paper's
    # InternVL2-8B/26B). InternVL2 checkpoints with a Qwen2 or Llama LM (1B, 40B) match the
    # Llama-naming fallback at language_model.model.layers instead; Phi-3 (4B) is not supported.
    # The config has no image token id: <IMG_CONTEXT> is looked up in the tokenizer.
    ModelFamily(
        name="internvl2-internlm2",
        model_types=("internvl_chat",),
        classes=("InternVLChatModel",),
        layers="language_model.model.layers",
        groups=INTERNLM2_GROUPS,
        keep_fp=("vision_model", "mlp1", "language_model.model.tok_embeddings", "language_model.output"),
        image_token_id=None,
        image_token="<IMG_CONTEXT>",
        layer_returns_tuple=True,  # InternLM2DecoderLayer returns (hidden_states, [attn weights], [cache])
        remote_code=True,
        note="InternLM2 LM, fused wqkv and w1/w3/w2; decoder mapping only: no HF processor renders its calibration",
    ),
    # Idefics3 and SmolVLM: SigLIP + pixel-shuffle connector + a Llama-named LM under
    # model.text_model; images are split into tiles plus a global view.
    ModelFamily(
        name="idefics3",
        model_types=("idefics3",),
        classes=("Idefics3ForConditionalGeneration",),
        layers="model.text_model.layers",
        groups=LLAMA_GROUPS,
        keep_fp=_IDEFICS_FP,
        note="image splitting into tiles + global view",
    ),
    ModelFamily(
        name="smolvlm",
        model_types=("smolvlm",),
        classes=("SmolVLMForConditionalGeneration",),
        layers="model.text_model.layers",
        groups=LLAMA_GROUPS,
        keep_fp=_IDEFICS_FP,
        note="the Idefics3 layout; SmolVLM / SmolVLM2",
    ),
    # Gemma 3: see GEMMA3_GROUPS. Sliding-window and global layers alternate; each layer's
    # own mask and rotary embeddings are captured with its kwargs. A fixed number of soft
    # image tokens per image (mm_tokens_per_image), attended bidirectionally (token_type_ids).
    ModelFamily(
        name="gemma3",
        model_types=("gemma3",),
        classes=("Gemma3ForConditionalGeneration",),
        layers="model.language_model.layers",
        groups=GEMMA3_GROUPS,
        keep_fp=(*_LLAVA_FP,),
        image_tokens_per_image="mm_tokens_per_image",
        note="(1 + w) RMSNorms, pre/post feed-forward norms, sliding-window layers",
    ),
)

# Where a Llama-named decoder may live when the model type is unknown.
_FALLBACK_LAYER_PATHS = (
    "model.language_model.layers",
    "language_model.model.layers",
    "model.text_model.layers",
    "model.layers",
)

HOW_TO_ADD = (
    "to add a family, append a ModelFamily entry to FAMILIES in qig/models/families.py (decoder layers path, "
    "scale groups, parts kept in full precision, image token) and a tiny-config test in tests/models"
)


def family_for(model: torch.nn.Module) -> ModelFamily:
    """The family entry for ``model``: by ``config.model_type`` and layer names, else by the Llama naming convention.

    >>> family_for(model).name  # doctest: +SKIP
    'qwen2-vl'
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if fam.matches(model):
            return fam
    for path in _FALLBACK_LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and _has_names(layers[0], LLAMA_GROUPS):
            log.info("model type %r has no family entry; using the Llama naming convention at %s", model_type, path)
            return ModelFamily(
                name=f"llama-names:{model_type}",
                model_types=(),
                layers=path,
                groups=LLAMA_GROUPS,
                image_token=_GENERIC_IMAGE_TOKEN,
            )
    families = "; ".join(f"{fam.name} ({', '.join(fam.classes)})" for fam in FAMILIES)
    raise QigError(
        f"{type(model).__name__} (model type {model_type!r}) is not supported: no family entry matches it and it has "
        f"no Llama-named decoder layers (self_attn.q_proj/k_proj/v_proj/o_proj, mlp.gate_proj/up_proj/down_proj) at "
        f"{', '.join(_FALLBACK_LAYER_PATHS)}. Supported families: {families}. {HOW_TO_ADD}"
    )


_GENERIC_IMAGE_TOKEN = "<image>"  # the fallback's guess when the config names no image token id


def _has_names(layer: torch.nn.Module, groups: tuple[ScaleGroup, ...]) -> bool:
    names = {n for n, _ in layer.named_modules()}
    return all(p in names for g in groups for p in (g.prev, *g.linears, g.block))
