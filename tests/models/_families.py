"""Tiny random-weight models of every supported family, with processors built offline from local pieces.

Each builder returns ``(model, processor)``: the family's own transformers
model class from its config class (hidden 64, 2 decoder layers, a 1-layer
vision tower, small images), and the family's own processor class from its
image processor (small sizes), a word-level tokenizer over the embedded
world's vocabulary plus the family's special tokens, and a chat template of
the family's shape. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from PIL import Image

from qig.embedded import world

HIDDEN = 64
LAYERS = 2


@dataclass(frozen=True)
class Size:
    """The widths of a tiny model. ``DEFAULT`` keeps the tests fast; ``SERVABLE`` is what vLLM's CPU backend runs.

    vLLM's CPU attention refuses head_dim 16 ("Unsupported CPU attention configuration: head_dim=16"; it takes
    32 and up), so the servable decoders have head_dim 64, and their vision towers too.
    """

    hidden: int = HIDDEN
    heads: int = 4
    kv_heads: int = 2  # GQA; the MHA builders (LLaVA-1.5, Gemma 3) pass heads instead
    vision: int = 32
    vision_heads: int = 2
    newlines: int = 2  # the longest run of "\n" the tokenizers hold as one token (vLLM's Gemma 3 looks up 3 and 4)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mrope(self) -> list[int]:
        """M-RoPE sections (temporal, height, width) summing to head_dim / 2, in Qwen's 2:3:3 proportion."""
        eighth = self.head_dim // 8
        return [eighth, (self.head_dim // 2 - eighth) // 2, (self.head_dim // 2 - eighth) // 2]

    def tower(self, **extra) -> dict:
        """A one-layer vision tower of this size (CLIP / SigLIP / InternViT / Idefics3 field names)."""
        return dict(
            hidden_size=self.vision,
            intermediate_size=2 * self.vision,
            num_hidden_layers=1,
            num_attention_heads=self.vision_heads,
            **extra,
        )


DEFAULT = Size()
SERVABLE = Size(hidden=256, heads=4, kv_heads=2, vision=128, vision_heads=2, newlines=4)  # head_dims 64


def tokenizer(
    special: list[str], eos: str, pad: str, extra: dict | None = None, bos: str | None = None, newlines: int = 2
):
    """A word-level tokenizer over the world's words, with ``special`` as unsplittable special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "system", "user", "assistant", "model", "\n", "\n\n", ":"] + world.vocabulary()
    specials = list(dict.fromkeys([pad, eos, *([bos] if bos else []), *special]))
    vocab: dict[str, int] = {}
    for t in specials + words:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    runs = ["\n" * n for n in range(newlines, 0, -1)]  # longest first
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in runs])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        unk_token="<unk>",
        eos_token=eos,
        bos_token=bos,
        extra_special_tokens=extra or {},
        padding_side="right",
    )


def no_video_processor():
    """A stand-in for the video half of the Qwen / InternVL / OneVision / SmolVLM processors.

    transformers builds video processors on torchvision, which this environment
    does not have, and its processor check cannot even name the video base class
    then. Calibration is images only; the stand-in refuses videos.
    """
    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    if not hasattr(transformers, "VideoProcessorMixin"):  # unexported without torchvision
        transformers.VideoProcessorMixin = VideoProcessorMixin

    class NoVideo(VideoProcessorMixin):
        merge_size = 2
        num_frames = fps = None  # read by SmolVLM's apply_chat_template

        def preprocess(self, *args, **kwargs):
            raise RuntimeError("this test processor has no video support")

    return NoVideo()


def chat_template(turn_open: dict[str, str], turn_close: str, image: str, start: str = "", generation: str = "") -> str:
    """A Jinja chat template: ``start``, then per message ``turn_open[role]`` + content + ``turn_close``."""
    opens = "".join(
        f"{{% {'if' if i == 0 else 'elif'} message['role'] == '{role}' %}}{text}"
        for i, (role, text) in enumerate(turn_open.items())
    )
    return (
        start + "{% for message in messages %}" + opens + "{% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}" + image + "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}" + turn_close + "{% endfor %}"
        "{% if add_generation_prompt %}" + generation + "{% endif %}"
    )


CHATML = dict(
    turn_open={r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")},
    turn_close="<|im_end|>\n",
    generation="<|im_start|>assistant\n",
)
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


def text_config(tok, size: Size = DEFAULT, mha: bool = False, **extra) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=size.hidden,
        intermediate_size=2 * size.hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads if mha else size.kv_heads,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **extra,
    )


def image(width: int = 48, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


# ------------------------------------------------------------------ LLaVA


def llava_1_5(dims: Size = DEFAULT):
    """LLaVA-1.5: CLIP tower + Llama LM with multi-head attention (the v->o group exists); a fixed 16 image tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    template = chat_template(
        {"user": "USER: ", "assistant": "ASSISTANT: "}, "</s>", "<image>\n", generation="ASSISTANT:"
    )
    tok = tokenizer(["<image>", "USER:", "ASSISTANT:"], eos="</s>", pad="<pad>", extra={"image_token": "<image>"})
    size = 16
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        chat_template=template,
        image_token="<image>",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )
    vision = CLIPVisionConfig(**dims.tower(image_size=size, patch_size=4))
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text_config(tok, dims, mha=True)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(size // 4) ** 2,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(config), proc


def llava_next(dims: Size = DEFAULT):
    """LLaVA-NeXT: anyres tiling (a base view + tiles by aspect ratio, newline tokens per row)."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        MistralConfig,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    template = chat_template({"user": "[INST] ", "assistant": " "}, "", "<image>\n", generation="")
    template = template.replace(
        "{% endfor %}{% if add",
        "{% if message['role'] == 'user' %} [/INST]{% else %}</s>{% endif %}{% endfor %}{% if add",
    )
    tok = tokenizer(["<image>", "[INST]", "[/INST]"], eos="</s>", pad="<pad>", extra={"image_token": "<image>"})
    size, pinpoints = 16, [[16, 32], [32, 16], [32, 32]]
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        chat_template=template,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(**dims.tower(image_size=size, patch_size=4))
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=MistralConfig(**text_config(tok, dims), sliding_window=None),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaNextForConditionalGeneration(config), proc


def llava_onevision(dims: Size = DEFAULT):
    """LLaVA-OneVision: SigLIP tower + Qwen2 LM (GQA), anyres_max tiling, ChatML."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    template = chat_template(**CHATML, image="<image>\n")
    tok = tokenizer(
        [*CHATML_TOKENS, "<image>", "<video>"],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra={"image_token": "<image>", "video_token": "<video>"},
    )
    size, pinpoints = 16, [[16, 16], [16, 32], [32, 16], [32, 32]]
    proc = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(
            size={"height": size, "width": size}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tok,
        video_processor=no_video_processor(),
        num_image_tokens=(size // 4) ** 2,
        vision_feature_select_strategy="full",
        chat_template=template,
    )
    vision = SiglipVisionConfig(**dims.tower(image_size=size, patch_size=4))
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**text_config(tok, dims)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaOnevisionForConditionalGeneration(config), proc


# ------------------------------------------------------------------ Qwen-VL

QWEN_TOKENS = [*CHATML_TOKENS, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_processor(processor_cls, patch: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tokenizer(QWEN_TOKENS, eos="<|im_end|>", pad="<|endoftext|>")
    template = chat_template(**CHATML, image="<|vision_start|><|image_pad|><|vision_end|>")
    unit = patch * 2  # one merged token covers 2x2 patches
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 4 * unit * unit, "longest_edge": 16 * unit * unit},
    )
    proc = processor_cls(
        image_processor=image_processor, tokenizer=tok, video_processor=no_video_processor(), chat_template=template
    )
    return tok, proc


def _qwen_token_ids(tok) -> dict:
    image, video, start, end = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return dict(image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)


MROPE = {"rope_type": "default", "rope_theta": 10000.0}  # mrope_section: Size.mrope, [2, 3, 3] at head_dim 16


def qwen2_vl(dims: Size = DEFAULT):
    """Qwen2-VL: dynamic resolution (the token count follows the image size), M-RoPE 3D positions."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok, proc = _qwen_processor(Qwen2VLProcessor, patch=4)
    config = Qwen2VLConfig(
        text_config=text_config(tok, dims, rope_parameters=dict(MROPE, mrope_section=dims.mrope)),
        vision_config=dict(
            depth=1,
            embed_dim=dims.vision,
            hidden_size=dims.hidden,
            num_heads=dims.vision_heads,
            patch_size=4,
            mlp_ratio=2,
        ),
        **_qwen_token_ids(tok),
    )
    return Qwen2VLForConditionalGeneration(config), proc


def qwen2_5_vl(dims: Size = DEFAULT):
    """Qwen2.5-VL: as Qwen2-VL, with a windowed-attention SwiGLU vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok, proc = _qwen_processor(Qwen2_5_VLProcessor, patch=4)
    config = Qwen2_5_VLConfig(
        text_config=text_config(tok, dims, rope_parameters=dict(MROPE, mrope_section=dims.mrope)),
        vision_config=dict(
            depth=2,
            hidden_size=dims.vision,
            intermediate_size=2 * dims.vision,
            num_heads=dims.vision_heads,
            patch_size=4,
            out_hidden_size=dims.hidden,
            window_size=16,
            fullatt_block_indexes=[1],
        ),
        **_qwen_token_ids(tok),
    )
    return Qwen2_5_VLForConditionalGeneration(config), proc


def qwen3_vl(dims: Size = DEFAULT):
    """Qwen3-VL: interleaved M-RoPE, q/k norms, and DeepStack features added after the first decoder layers."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tok, proc = _qwen_processor(Qwen3VLProcessor, patch=4)
    rope = dict(MROPE, mrope_section=dims.mrope, mrope_interleaved=True)
    config = Qwen3VLConfig(
        text_config=text_config(tok, dims, head_dim=dims.head_dim, rope_parameters=rope),
        vision_config=dict(
            depth=2,
            hidden_size=dims.vision,
            intermediate_size=2 * dims.vision,
            num_heads=dims.vision_heads,
            patch_size=4,
            out_hidden_size=dims.hidden,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        **_qwen_token_ids(tok),
    )
    return Qwen3VLForConditionalGeneration(config), proc


# ------------------------------------------------------------------ InternVL, Idefics3, SmolVLM, Gemma 3


def internvl(dims: Size = DEFAULT):
    """InternVL (HF-native, InternVL3 style): InternViT + pixel shuffle + Qwen2 LM; tiles with a thumbnail."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    template = chat_template(**CHATML, image="<IMG_CONTEXT>\n")
    tok = tokenizer(
        [*CHATML_TOKENS, "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    size = 16
    proc = InternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil(
            size={"height": size, "width": size}, crop_to_patches=True, min_patches=1, max_patches=4
        ),
        tokenizer=tok,
        video_processor=no_video_processor(),
        image_seq_length=(size // 4) ** 2 // 4,  # pixel shuffle 0.5 merges 2x2 patches
        chat_template=template,
    )
    config = InternVLConfig(
        vision_config=dims.tower(image_size=[size, size], patch_size=[4, 4]),
        text_config=dict(model_type="qwen2", **text_config(tok, dims)),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        downsample_ratio=0.5,
        image_seq_length=(size // 4) ** 2 // 4,
    )
    return InternVLForConditionalGeneration(config), proc


IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]


def _idefics_parts(image_processor_cls, size: int):
    template = chat_template(
        {"user": "User:", "assistant": "Assistant:"},
        "<end_of_utterance>\n",
        "<image>",
        start="<|im_start|>",
        generation="Assistant:",
    )
    tok = tokenizer(
        ["<|im_start|>", "User:", "Assistant:", *IDEFICS_TOKENS],
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        extra={"image_token": "<image>"},
    )
    image_processor = image_processor_cls(
        size={"longest_edge": 2 * size}, max_image_size={"longest_edge": size}, do_image_splitting=True
    )
    return tok, template, image_processor


def idefics3(dims: Size = DEFAULT):
    """Idefics3: SigLIP + pixel shuffle + Llama; an image is split into a grid of tiles plus a global view."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    size = 16
    tok, template, ip = _idefics_parts(Idefics3ImageProcessorPil, size)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=template)
    config = Idefics3Config(
        vision_config=dims.tower(image_size=size, patch_size=4),
        text_config=dict(model_type="llama", **text_config(tok, dims)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,  # (16/4)^2 patches / 2^2 = 4 tokens per tile
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return Idefics3ForConditionalGeneration(config), proc


def smolvlm(dims: Size = DEFAULT):
    """SmolVLM: the Idefics3 layout with its own processor (and video support, unused here)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    size = 16
    tok, template, ip = _idefics_parts(SmolVLMImageProcessorPil, size)
    proc = SmolVLMProcessor(
        image_processor=ip, tokenizer=tok, video_processor=no_video_processor(), image_seq_len=4, chat_template=template
    )
    config = SmolVLMConfig(
        vision_config=dims.tower(image_size=size, patch_size=4),
        text_config=dict(model_type="llama", **text_config(tok, dims)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return SmolVLMForConditionalGeneration(config), proc


def gemma3(dims: Size = DEFAULT):
    """Gemma 3: SigLIP + pooled 2x2 soft tokens; extra norms, (1 + w) RMSNorms, sliding-window layers, MHA."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    template = chat_template(
        {"user": "<start_of_turn>user\n", "assistant": "<start_of_turn>model\n"},
        "<end_of_turn>\n",
        "<start_of_image>",
        start="<bos>",
        generation="<start_of_turn>model\n",
    )
    tok = tokenizer(
        ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        eos="<end_of_turn>",
        pad="<pad>",
        bos="<bos>",
        newlines=dims.newlines,
        extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    size = 16
    proc = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tok,
        image_seq_length=4,
        chat_template=template,
    )
    config = Gemma3Config(
        vision_config=dims.tower(image_size=size, patch_size=4),
        # kv_heads = heads: multi-head attention, so the v->o group exists; layer 0 slides, layer 1 is global
        text_config=dict(
            **text_config(tok, dims, mha=True),
            head_dim=dims.head_dim,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
        mm_tokens_per_image=4,
        image_token_id=tok.convert_tokens_to_ids("<image_soft_token>"),
        boi_token_id=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_id=tok.convert_tokens_to_ids("<end_of_image>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return Gemma3ForConditionalGeneration(config), proc


@dataclass(frozen=True)
class Tiny:
    family: str  # the qig family name the model must map to
    build: object


TINY = {
    "llava-1.5": Tiny("llava", llava_1_5),
    "llava-next": Tiny("llava-next", llava_next),
    "llava-onevision": Tiny("llava-onevision", llava_onevision),
    "qwen2-vl": Tiny("qwen2-vl", qwen2_vl),
    "qwen2.5-vl": Tiny("qwen2.5-vl", qwen2_5_vl),
    "qwen3-vl": Tiny("qwen3-vl", qwen3_vl),
    "internvl": Tiny("internvl", internvl),
    "idefics3": Tiny("idefics3", idefics3),
    "smolvlm": Tiny("smolvlm", smolvlm),
    "gemma3": Tiny("gemma3", gemma3),
}


@cache
def _built(name: str, seed: int, size: Size):
    torch.manual_seed(seed)
    model, proc = TINY[name].build(size)
    return model.eval(), proc


def build(name: str, seed: int = 0, size: Size = DEFAULT):
    """A fresh copy of family ``name``'s tiny model, and its processor; ``size=SERVABLE`` for vLLM."""
    import copy

    model, proc = _built(name, seed, size)
    return copy.deepcopy(model), proc
