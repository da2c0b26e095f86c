"""Random-weight LLaVA-OneVision models at real dimensions, built offline, for the scale benchmark.

transformers' own config classes (``LlavaOnevisionConfig``, ``Qwen2Config``,
``SiglipVisionConfig``) at a real decoder's width (Qwen2-0.5B by default:
hidden 896, 14 / 2 heads, intermediate 4864) and a chosen depth; a SigLIP
tower at the real width (1152, patch 14, image 384: 27 x 27 = 729 patches per
tile) cut to a few layers; the embedded model's word-level tokenizer (its
75-word vocabulary keeps the embedding and ``lm_head`` negligible, so the
decoder layers are what is measured) with a ``<video>`` token added; and a
``LlavaOnevisionProcessor`` with the LLaVA-OneVision image processor at 384.

The token count per image follows the anyres grid (``GRIDS``): OneVision
always adds the base 384 view (729 tokens) to the unpadded tiles and one
newline per row of tiles, so the embedded world's square images give
729 + 729 + 27 = 1485 vision tokens on the 1x1 grid, 729 + 54^2 + 54 = 3699 on
2x2 and 729 + 81^2 + 81 = 7371 on 3x3 (the anyres_max_9 ceiling).

    python benchmarks/_random_models.py /tmp/ov-6 --layers 6            # build one folder
    qig quantize --model /tmp/ov-6 --method rtn --wbits 4 --output /tmp/x  # needs torchvision: see below

Without torchvision, transformers cannot load any LLaVA-OneVision processor
(its video half is a torchvision class, loaded even for images):
:func:`allow_onevision_without_torchvision` installs an images-only stand-in
in the current process (``benchmarks/_child.py`` calls it). The saved folder
itself names the real ``LlavaOnevisionVideoProcessor``, so it loads as a real
checkpoint does wherever torchvision is installed.

:func:`build_llava` builds the same decoder in the embedded model's layout
instead (``LlavaForConditionalGeneration``, ``LlavaProcessor``, no video half,
no torchvision needed): the model ``benchmarks/vs_llmcompressor.py`` gives both
tools, since llm-compressor loads it as its docs load a VLM
(``AutoModelForImageTextToText``). Its SigLIP tower at the real width sees
336 px images in 14 px patches: 24 x 24 = 576 image tokens per sample, LLaVA-1.5's
count, plus the caption.

    python benchmarks/_random_models.py /tmp/llava-4 --layers 4 --layout llava
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# Decoder dimensions of the Qwen2 LMs of LLaVA-OneVision 0.5B / 7B / 72B (their config.json files).
DECODERS = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4),
    "qwen2-72b": dict(hidden_size=8192, intermediate_size=29568, num_attention_heads=64, num_key_value_heads=8),
}
FULL_DEPTH = {"qwen2-0.5b": 24, "qwen2-7b": 28, "qwen2-72b": 80}
VOCAB = {"qwen2-0.5b": 151936, "qwen2-7b": 152064, "qwen2-72b": 152064}  # the real models' (not built here)
# SigLIP-so400m/14 at 384, LLaVA-OneVision's tower (no attention-pooling head, as its config says); only its depth
# is cut.
VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_attention_heads=16,
    patch_size=14,
    image_size=384,
    vision_use_head=False,
)
TILE = 384
PATCHES = (TILE // VISION["patch_size"]) ** 2  # 729 tokens per 384 view
# anyres grids: one pinpoint each, so every (square) image gets that many tiles.
GRIDS = {"1x1": [[384, 384]], "2x2": [[768, 768]], "3x3": [[1152, 1152]]}
LLAVA_IMAGE = 336  # build_llava's image side: 24 x 24 patches of 14 px = 576 image tokens, as LLaVA-1.5
LLAVA_MAX_LENGTH = 4096  # build_llava's max_position_embeddings and tokenizer cap: far above a sample's length
BUILD_FILE = "qig_random_build.json"  # what a cached folder was built with
BUILD_VERSION = 2  # raised whenever what is built changes, so older cached folders are rebuilt


def vision_tokens(grid: str) -> int:
    """Vision tokens of one square image on ``grid``: base view + unpadded tiles + one newline per row.

    >>> [vision_tokens(g) for g in GRIDS]
    [1485, 3699, 7371]
    """
    rows, cols = (int(n) for n in grid.split("x"))
    side = int(math.isqrt(PATCHES))  # 27 patches per tile side
    h, w = rows * side, cols * side
    ratio = math.sqrt(h * w / (9 * PATCHES))  # anyres_max_9: more than 9 tiles' worth is pooled down
    unpadded = int(h // ratio) * int(w // ratio) if ratio > 1.1 else h * w
    return PATCHES + unpadded + h


def tokenizer():
    """The embedded model's word-level tokenizer with a ``<video>`` special token, no length cap of its own."""
    from tokenizers import AddedToken

    from qig.embedded import build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens([AddedToken("<video>", special=True, normalized=False)], special_tokens=True)
    tok.model_max_length = 32768
    return tok


def _no_video_processor():
    """An images-only stand-in for OneVision's torchvision video processor (refuses videos)."""
    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    if not hasattr(transformers, "VideoProcessorMixin"):  # unexported without torchvision
        transformers.VideoProcessorMixin = VideoProcessorMixin

    class NoVideo(VideoProcessorMixin):
        def preprocess(self, *args, **kwargs):
            raise RuntimeError("this stand-in video processor has no video support (install torchvision)")

        def to_dict(self):
            return {"video_processor_type": "LlavaOnevisionVideoProcessor"}

    return NoVideo()


def torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


def allow_onevision_without_torchvision() -> bool:
    """Without torchvision, let ``AutoProcessor`` load LLaVA-OneVision folders in this process (images only).

    transformers loads a processor's video half through ``AutoVideoProcessor``,
    which needs torchvision even where no video is processed; this points
    that lookup at :class:`StandInVideoLoader` instead. With torchvision
    nothing is changed. Returns whether the stand-in was installed.
    """
    if torchvision_available():
        return False
    from transformers import processing_utils

    mapping = processing_utils.MODALITY_TO_AUTOPROCESSOR_MAPPING
    mapping._MAPPING_NAMES = {**mapping._MAPPING_NAMES, "video_processor": (__name__, StandInVideoLoader.__name__)}
    return True


class StandInVideoLoader:
    """What ``AutoVideoProcessor.from_pretrained`` gives without torchvision: the images-only stand-in."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return _no_video_processor()


def processor(grid: str = "1x1"):
    """``LlavaOnevisionProcessor``: OneVision's image processor at 384 with one anyres pinpoint, ChatML."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from qig.embedded.model import CHAT_TEMPLATE

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, image_grid_pinpoints=GRIDS[grid]
    )
    if torchvision_available():
        from transformers import LlavaOnevisionVideoProcessor

        video = LlavaOnevisionVideoProcessor()
    else:
        video = _no_video_processor()
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer(),
        video_processor=video,
        num_image_tokens=PATCHES,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
    )


def onevision_config(layers: int, decoder: str = "qwen2-0.5b", grid: str = "1x1", vision_layers: int = 2):
    """``LlavaOnevisionConfig`` with ``decoder``'s dimensions at depth ``layers``, the tokenizer's vocabulary."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    tok = tokenizer()
    text = Qwen2Config(
        vocab_size=len(tok),
        num_hidden_layers=layers,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **DECODERS[decoder],
    )
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(num_hidden_layers=vision_layers, **VISION),
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=GRIDS[grid],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def build_onevision(
    folder: str | Path,
    layers: int,
    seed: int = 0,
    decoder: str = "qwen2-0.5b",
    grid: str = "1x1",
    vision_layers: int = 2,
    dtype: str = "bfloat16",
    max_shard_size: str = "200MB",
) -> Path:
    """Save a random-weight LLaVA-OneVision (model + processor) to ``folder``; reuse it if built alike before.

    The weights are saved in ``dtype`` as sharded safetensors (several shards at
    the default ``max_shard_size``), loadable by ``qig quantize --model folder``.

    >>> build_onevision("/tmp/ov-2", layers=2)  # doctest: +SKIP
    PosixPath('/tmp/ov-2')
    """
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    folder = Path(folder)
    spec = dict(
        version=BUILD_VERSION,
        layers=layers,
        seed=seed,
        decoder=decoder,
        grid=grid,
        vision_layers=vision_layers,
        dtype=dtype,
        max_shard_size=max_shard_size,
    )
    if _built(folder, spec):
        return folder
    torch.manual_seed(seed)
    config = onevision_config(layers, decoder, grid, vision_layers)
    model = LlavaOnevisionForConditionalGeneration(config).to(getattr(torch, dtype)).eval()
    _save(folder, model, processor(grid), spec)
    _name_real_video_processor(folder)
    _built(folder, spec, mark=True)
    return folder


def _built(folder: Path, spec: dict, mark: bool = False) -> bool:
    """Whether ``folder`` holds a model built with ``spec``; ``mark``: record that it now does."""
    marker = folder / BUILD_FILE
    if mark:
        marker.write_text(json.dumps(spec, indent=1))
    return marker.is_file() and json.loads(marker.read_text()) == spec


def _save(folder: Path, model, proc, spec: dict) -> None:
    """Save model (sharded at ``spec``'s size) and processor into ``folder``, replacing any older build."""
    model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
    model.generation_config.eos_token_id = proc.tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BUILD_FILE).unlink(missing_ok=True)
    for old in folder.glob("*.safetensors*"):
        old.unlink()
    model.save_pretrained(folder, max_shard_size=spec["max_shard_size"])
    proc.save_pretrained(folder)


def llava_processor():
    """``LlavaProcessor`` as the embedded model's (tokenizer, ChatML, SigLIP image processor) at ``LLAVA_IMAGE`` px."""
    from transformers import LlavaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from qig.embedded.model import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer

    tok = build_tokenizer()
    tok.model_max_length = LLAVA_MAX_LENGTH
    side = {"height": LLAVA_IMAGE, "width": LLAVA_IMAGE}
    image_processor = SiglipImageProcessorPil(size=side, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=VISION["patch_size"],
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )


def llava_config(layers: int, decoder: str = "qwen2-0.5b", vision_layers: int = 2):
    """``LlavaConfig`` as the embedded model's, ``decoder``'s dimensions at depth ``layers``, a real-width tower."""
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    from qig.embedded.model import IMAGE_TOKEN, build_tokenizer

    tok = build_tokenizer()
    text = Qwen2Config(
        vocab_size=len(tok),
        num_hidden_layers=layers,
        max_position_embeddings=LLAVA_MAX_LENGTH,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **DECODERS[decoder],
    )
    return LlavaConfig(
        vision_config=SiglipVisionConfig(num_hidden_layers=vision_layers, **{**VISION, "image_size": LLAVA_IMAGE}),
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=(LLAVA_IMAGE // VISION["patch_size"]) ** 2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )


def build_llava(
    folder: str | Path,
    layers: int,
    seed: int = 0,
    decoder: str = "qwen2-0.5b",
    vision_layers: int = 2,
    dtype: str = "bfloat16",
    max_shard_size: str = "200MB",
) -> Path:
    """Save a random-weight LLaVA in the embedded model's layout (model + processor) to ``folder``; reuse it if built
    alike before.

    >>> build_llava("/tmp/llava-4", layers=4)  # doctest: +SKIP
    PosixPath('/tmp/llava-4')
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    folder = Path(folder)
    spec = dict(
        version=BUILD_VERSION,
        layout="llava",
        layers=layers,
        seed=seed,
        decoder=decoder,
        vision_layers=vision_layers,
        image=LLAVA_IMAGE,
        dtype=dtype,
        max_shard_size=max_shard_size,
    )
    if _built(folder, spec):
        return folder
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(layers, decoder, vision_layers))
    _save(folder, model.to(getattr(torch, dtype)).eval(), llava_processor(), spec)
    _built(folder, spec, mark=True)
    return folder


def _name_real_video_processor(folder: Path) -> None:
    """The saved processor names OneVision's own video processor (class defaults), whatever stood in for it."""
    path = folder / "processor_config.json"
    config = json.loads(path.read_text())
    if config.get("video_processor", {}).get("video_processor_type") != "LlavaOnevisionVideoProcessor":
        config["video_processor"] = {"video_processor_type": "LlavaOnevisionVideoProcessor"}
        path.write_text(json.dumps(config, indent=2) + "\n")


def decoder_layer_params(decoder: str) -> int:
    """Weights of one decoder layer (q/k/v with biases, o, gate/up/down, two norms).

    >>> decoder_layer_params("qwen2-0.5b")
    14912384
    """
    d = DECODERS[decoder]
    h, i = d["hidden_size"], d["intermediate_size"]
    kv = h // d["num_attention_heads"] * d["num_key_value_heads"]
    return h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--decoder", choices=list(DECODERS), default="qwen2-0.5b")
    p.add_argument("--grid", choices=list(GRIDS), default="1x1")
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--max-shard-size", default="200MB")
    p.add_argument("--layout", choices=["onevision", "llava"], default="onevision", help="llava: --grid is not used")
    a = p.parse_args(argv)
    if a.layout == "llava":
        folder = build_llava(a.folder, a.layers, a.seed, a.decoder, a.vision_layers, a.dtype, a.max_shard_size)
    else:
        folder = build_onevision(
            a.folder, a.layers, a.seed, a.decoder, a.grid, a.vision_layers, a.dtype, a.max_shard_size
        )
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
