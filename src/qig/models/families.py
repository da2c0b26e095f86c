"""Per-architecture knowledge, kept as data (STYLE.md rule 6).

A :class:`ModelFamily` says where an LVLM's decoder layers are, which of its
parts stay in full precision, and the scale groups of one decoder layer
(METHOD.md section 3): the previous op whose output channels absorb ``1/s``,
the linears whose input columns absorb ``s``, and the block whose output the
search inspects. For serving it says how its saved keys must look for vLLM's
loader (``serving_keys``) and which modules a compressed-tensors export
leaves in full precision (``ignore``). Adding a family is one entry in
:data:`FAMILIES` plus a tiny-config test.

    >>> from qig.models import FAMILIES
    >>> [g.name for g in FAMILIES[0].groups]
    ['attn_in', 'attn_out', 'mlp_in', 'mlp_out']
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from qig.errors import QigError
from qig.models.family import KeyRename, ModelFamily, ScaleGroup, has_names

if TYPE_CHECKING:  # annotations only; family_for imports it (see qig.models.family)
    import torch

log = logging.getLogger(__name__)


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

# Serving key layout of CLIP and SigLIP towers. transformers 5 drops their `vision_model.` level when it loads
# one (transformers/conversion_mapping.py: PrefixChange(prefix_to_remove="vision_model") for CLIPVisionModel and
# its aliases, SiglipVisionModel among them) and does not put it back on save, so save_pretrained writes
# `vision_tower.encoder.*`. vLLM builds these towers with the level (vllm/model_executor/models/clip.py and
# siglip.py: `self.vision_model = CLIPVisionTransformer / SiglipVisionTransformer`) and refuses flat keys;
# transformers reads both. Only the children of CLIP's and SigLIP's transformer get the level, so a Pixtral tower
# in a LLaVA checkpoint (patch_conv, ln_pre, transformer: the same names in both libraries) is left as it is.
CLIP_SIGLIP_TOWER = KeyRename(
    r"^((?:model\.)?vision_tower\.)(?=(?:embeddings|pre_layrnorm|encoder|post_layernorm|head)\.)",
    r"\1vision_model.",
)

# compressed-tensors ignore entries, as llm-compressor writes them for these models: regexes on the part's name,
# which match transformers' in-memory names (model.vision_tower.*), the saved ones (vision_tower.*) and vLLM's
# (vision_tower.vision_model.*, language_model.lm_head) alike.
_LLAVA_IGNORE = ("re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*lm_head")
_QWEN_IGNORE = ("re:.*visual.*", "re:.*lm_head")
_IDEFICS_IGNORE = ("re:.*vision_model.*", "re:.*connector.*", "re:.*lm_head")

# Serving layouts checked against vLLM 0.32's loaders (vllm/model_executor/models/; tests/models/test_layout.py
# writes down what each expects): llava, llava-next, llava-onevision and gemma3 build CLIP / SigLIP towers with the
# `vision_model.` level (llava.py init_vision_tower_for_llava, gemma3_mm.py), hence CLIP_SIGLIP_TOWER; the embedded
# model (SigLIP) is served by scripts/check_vllm.sh, a tiny CLIP LLaVA was loaded once. The others need no rename:
# qwen2-vl / qwen2.5-vl / qwen3-vl map `model.visual.` / `visual.` and `model.` (qwen2_vl.py, qwen2_5_vl.py,
# qwen3_vl.py: hf_to_vllm_mapper) onto the same tower names as transformers'; idefics3 / smolvlm have no mapper and
# transformers' `model.vision_model / connector / text_model` names (idefics3.py, Idefics3Model); HF-native internvl
# is vLLM's InternS1 class (interns1.py, interns1_vit.py: embeddings, encoder.layer.N as transformers); InternVL2's
# remote code saves its own names, which internvl.py reads. Every family here but internvl2-internlm2 is served from
# a tiny model (FP, AWQ W4 and W8A8 compressed-tensors exports) by `scripts/check_vllm.sh --families`.

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
        serving_keys=(CLIP_SIGLIP_TOWER,),
        ignore=_LLAVA_IGNORE,
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
        serving_keys=(CLIP_SIGLIP_TOWER,),
        ignore=_LLAVA_IGNORE,
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
        serving_keys=(CLIP_SIGLIP_TOWER,),
        ignore=_LLAVA_IGNORE,
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
        ignore=_QWEN_IGNORE,
        note="the QIG paper's Qwen2-VL; dynamic resolution, M-RoPE",
    ),
    ModelFamily(
        name="qwen2.5-vl",
        model_types=("qwen2_5_vl",),
        classes=("Qwen2_5_VLForConditionalGeneration",),
        layers="model.language_model.layers",
        groups=LLAMA_GROUPS,
        keep_fp=_QWEN_FP,
        ignore=_QWEN_IGNORE,
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
        ignore=_QWEN_IGNORE,
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
        ignore=_LLAVA_IGNORE,
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
        ignore=("re:.*vision_model.*", "re:.*mlp1.*", r"re:.*language_model\.output"),
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
        ignore=_IDEFICS_IGNORE,
        note="image splitting into tiles + global view",
    ),
    ModelFamily(
        name="smolvlm",
        model_types=("smolvlm",),
        classes=("SmolVLMForConditionalGeneration",),
        layers="model.text_model.layers",
        groups=LLAMA_GROUPS,
        keep_fp=_IDEFICS_FP,
        ignore=_IDEFICS_IGNORE,
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
        serving_keys=(CLIP_SIGLIP_TOWER,),
        ignore=_LLAVA_IGNORE,
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
    import torch

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if fam.matches(model):
            return fam
    for path in _FALLBACK_LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and has_names(layers[0], LLAMA_GROUPS):
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
