"""A dry run on a real checkpoint's shapes, before any GPU hour: no weights are read.

From a model folder holding ``config.json`` (and ``preprocessor_config.json``
when the checkpoint has one), the model is built on the meta device and
:func:`preflight` reports, for a method config:

- every scale group of a decoder layer, resolved by the family entry (names and weight shapes);
- whether the group size divides every quantized linear's input width, or the one-line refusal
  :func:`group_size_refusal` gives (``qig quantize`` can raise it before loading anything:
  :func:`check_group_size`);
- the tensor-parallel degrees 1/2/4/8 vLLM would refuse for the export, and why (:func:`tp_refusals`);
- the vision tokens of one image at a real size, computed by the family's own image-processor
  class with the folder's preprocessor settings (:func:`vision_tokens`);
- the memory plan of the run on one GPU (:func:`qig.pipeline.plan.shape_plan`).

    >>> from qig.methods.config import make_config
    >>> report = preflight("tests/fixtures/real_configs/qwen2-vl-7b-instruct", make_config("awq", wbits=4))
    >>> report.vision["tokens_per_image"], report.tensor_parallel[2]
    (2304, [])
    >>> report.to_dict()["group_size_ok"]
    True

The vLLM rule (vLLM 0.32.0, read from its source; a degree is refused when any linear of the
decoder layer breaks it):

- ``QKVParallelLinear`` (q/k/v; ``vllm/model_executor/layers/linear.py``, ``QKVParallelLinear.__init__``):
  the attention heads divide by the degree; the KV heads divide by it, or it by them (replicas).
- ``MergedColumnParallelLinear`` / ``ColumnParallelLinear`` (gate/up; ``ColumnParallelLinear.__init__``):
  the output width divides by the degree (``divide(output_size, tp_size)``).
- ``RowParallelLinear`` (o/down; ``RowParallelLinear.__init__``): the input width divides by the
  degree (``divide(input_size, tp_size)``, ``vllm/distributed/utils.py``).
- Grouped weight-only export (``CompressedTensorsWNA16.create_weights``,
  ``layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py``): every linear's
  input width per partition is a whole number of groups (``verify_group_size_divides_partition``,
  ``vllm/distributed/utils.py``); the Marlin kernel's ``can_implement``
  (``model_executor/kernels/linear/mixed_precision/marlin.py``) refuses the same straddling group.
  Only row-parallel linears split their input, so this bites o_proj and down_proj. Per-channel
  weights (no group) repeat their scales on every rank: no such rule.
- The vision tower, though kept in full precision, is sharded too (default
  ``--mm-encoder-tp-mode weights``): its attention heads and MLP width divide by the degree
  (:func:`vision_tp_refusals`; Qwen2.5-VL's 3420-wide vision MLP refuses TP 8).

Tile misalignment is not a refusal in 0.32 (Marlin zero-pads it; Machete, on Hopper, wants input
widths per partition divisible by 64 and outputs by 128 but vLLM falls through to Marlin then).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qig.errors import QigError
from qig.models import ModelFamily, family_for, get_module, linears
from qig.pipeline.plan import MemoryPlan, gib, shape_plan

if TYPE_CHECKING:
    from qig.methods.config import QuantConfig

log = logging.getLogger(__name__)

TP_DEGREES = (1, 2, 4, 8)
DEFAULT_DEVICE_MEMORY = 80 * 2**30  # one 80 GB GPU (A100 / H100)
DEFAULT_TEXT_TOKENS = 64  # text per calibration sample beside its image: chat template + a COCO-length caption
DEFAULT_IMAGE_SIZE = (1344, 1344)  # (width, height): a real photo's size, 2304 tokens for Qwen2-VL
GROUP_SIZE_CANDIDATES = (32, 64, 128, 256)  # group sizes vLLM's kernels and qig's export take
MARLIN_GROUP_SIZES = (128, 64, 32)  # MARLIN_SUPPORTED_GROUP_SIZES of vLLM 0.32 (marlin_utils.py), largest first

# How vLLM shards each decoder linear under tensor parallelism, by the linear's name inside the
# layer (Llama naming, which every family but InternLM2 uses; InternLM2's fused wqkv and w1/w3/w2).
PARALLEL_STYLE = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "wqkv": "qkv",
    "o_proj": "row",
    "wo": "row",
    "gate_proj": "column",
    "up_proj": "column",
    "w1": "column",
    "w3": "column",
    "down_proj": "row",
    "w2": "row",
}


def model_folder(reference: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of ``--model``: a folder as it is, a hub id (``org/name``) as its cached snapshot.

    A hub id is resolved by :func:`qig.hub.resolve_model` with ``config_only``: the repository's
    JSON files alone are fetched (config, processor settings), never its weights; offline
    (``HF_HUB_OFFLINE``), from the Hugging Face cache. ``revision``: its branch, tag or commit.
    """
    from qig.hub import resolve_model
    from qig.loading import read_vlm_config

    path = resolve_model(reference, revision, config_only=True).path
    read_vlm_config(path)  # the loader's own refusals: no folder, no config.json, no vision tower, remote code
    return path


def build_meta_model(folder: Path) -> torch.nn.Module:
    """The checkpoint's model class built from its config on the meta device, in the checkpoint's dtype."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        why = " ".join(str(exc).split())  # one line
        raise QigError(f"{folder / 'config.json'} cannot be read as a transformers config: {why}") from exc
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config, dtype=dtype)
    except ValueError as exc:
        why = " ".join(str(exc).split())
        raise QigError(f"{folder}: transformers has no image-text-to-text class for it: {why}") from exc


# ---------------------------------------------------------------- group size


def quantized_linears(model: torch.nn.Module, family: ModelFamily) -> dict[str, torch.nn.Linear]:
    """The linears of decoder layer 0, by name inside the layer (every layer has the same shapes)."""
    return linears(family.decoder_layers(model)[0])


def working_group_sizes(widths: list[int], candidates: tuple[int, ...] = GROUP_SIZE_CANDIDATES) -> list[int]:
    """The candidate group sizes that divide every width.

    >>> working_group_sizes([8192, 29568])
    [32, 64, 128]
    """
    return [g for g in candidates if all(w % g == 0 for w in widths)]


def group_size_refusal(widths: dict[str, int], group_size: int | None) -> str | None:
    """One line refusing ``group_size`` (naming the first linear it does not divide and the sizes that work), or None.

    >>> print(group_size_refusal({"mlp.down_proj": 29568, "self_attn.q_proj": 8192}, 256))
    group_size 256 does not divide in_features 29568 of mlp.down_proj; use 32, 64 or 128 (they divide every \
quantized linear), or per-channel (--group-size channel)
    """
    if group_size is None:
        return None
    bad = [(n, w) for n, w in widths.items() if w % group_size]
    if not bad:
        return None
    name, width = bad[0]
    ok = working_group_sizes(list(widths.values()))
    more = f" (and {len(bad) - 1} more linears)" if len(bad) > 1 else ""
    use = (
        f"use {_or(ok)} (they divide every quantized linear), or per-channel (--group-size channel)"
        if ok
        else "use per-channel (--group-size channel): no group size of 32-256 divides every quantized linear"
    )
    return f"group_size {group_size} does not divide in_features {width} of {name}{more}; {use}"


def check_group_size(model: torch.nn.Module, group_size: int | None, family: ModelFamily | None = None) -> None:
    """Raise :func:`group_size_refusal`'s line as a QigError; works on a meta model, so before any weight is read.

    >>> check_group_size(build_meta_model(model_folder("path/to/qwen2.5-vl-72b")), 256)  # doctest: +SKIP
    Traceback (most recent call last):
    qig.errors.QigError: group_size 256 does not divide in_features 29568 of mlp.down_proj; use 32, 64 or 128 ...
    """
    family = family or family_for(model)
    refusal = group_size_refusal({n: m.in_features for n, m in quantized_linears(model, family).items()}, group_size)
    if refusal:
        raise QigError(refusal)


def check_checkpoint_group_size(model_dir: str | os.PathLike, group_size: int | None) -> None:
    """:func:`check_group_size` on a checkpoint folder, from its config alone: the call ``qig quantize`` can make
    before it loads anything.

    >>> check_checkpoint_group_size("tests/fixtures/real_configs/qwen2.5-vl-72b-instruct", 128)
    >>> check_checkpoint_group_size("tests/fixtures/real_configs/qwen2.5-vl-72b-instruct", 256)
    Traceback (most recent call last):
    ...
    qig.errors.QigError: group_size 256 does not divide in_features 29568 of mlp.down_proj; use 32, 64 or 128 \
(they divide every quantized linear), or per-channel (--group-size channel)
    """
    if group_size is not None:
        check_group_size(build_meta_model(model_folder(model_dir)), group_size)


# ---------------------------------------------------------------- tensor parallelism


def tp_refusals(
    linears: dict[str, tuple[int, int]],
    heads: int,
    kv_heads: int,
    group_size: int | None,
    degree: int,
    grouped_export: bool = True,
) -> list[str]:
    """Why vLLM refuses tensor parallelism ``degree`` for these linears (``name: (out, in)``); [] when it loads.

    The rule is the module doc's (vLLM 0.32). ``grouped_export``: the weights are exported
    grouped (WNA16), so a partition must hold whole groups.

    >>> tp_refusals({"mlp.down_proj": (8192, 29568)}, 64, 8, 128, 2)
    ['mlp.down_proj: in_features 29568 / 2 = 14784 is not a whole number of groups of 128 (115.5)']
    """
    why = []
    if heads % degree:
        why.append(f"attention heads {heads} do not divide by {degree}")
    if degree >= kv_heads and degree % kv_heads or degree < kv_heads and kv_heads % degree:
        why.append(f"KV heads {kv_heads} and degree {degree}: neither divides the other")
    for name, (out, inp) in linears.items():
        style = PARALLEL_STYLE.get(name.rsplit(".", 1)[-1])
        if style == "column" and out % degree:
            why.append(f"{name}: out_features {out} do not divide by {degree}")
        if style == "row":
            if inp % degree:
                why.append(f"{name}: in_features {inp} do not divide by {degree}")
                continue
            part = inp // degree
            if grouped_export and group_size and part % group_size:
                why.append(
                    f"{name}: in_features {inp} / {degree} = {part} is not a whole number of groups of "
                    f"{group_size} ({part / group_size:g})"
                )
    return why


def vision_tp_refusals(vision_config, degree: int, model_type: str = "") -> list[str]:
    """Why vLLM refuses ``degree`` for the vision tower (kept in full precision but sharded like the decoder).

    vLLM 0.32 shards every tower it serves with the default ``--mm-encoder-tp-mode weights``: attention
    heads per rank (``divide(num_heads, tp_size)``) and the MLP as a column- then row-parallel pair
    (qwen2_vl.py, qwen2_5_vl.py ``Qwen2_5_VisionMLP``, qwen3_vl.py, siglip.py, clip.py,
    idefics2_vision_model.py, intern_vit.py). ``--mm-encoder-tp-mode data`` keeps the whole tower on
    every rank. InternViT gives up head sharding instead of refusing (intern_vit.py), so its heads
    are not checked.

    >>> from types import SimpleNamespace
    >>> vision_tp_refusals(SimpleNamespace(num_heads=16, intermediate_size=3420), 8)
    ['vision tower: MLP width 3420 does not divide by 8']
    """
    heads = getattr(vision_config, "num_heads", None) or getattr(vision_config, "num_attention_heads", None)
    width = getattr(vision_config, "intermediate_size", None)
    if width is None and getattr(vision_config, "mlp_ratio", None):  # Qwen2-VL's tower: embed_dim x mlp_ratio
        width = int(vision_config.embed_dim * vision_config.mlp_ratio)
    why = []
    if heads and degree > 1 and heads % degree and model_type not in _HEADS_NOT_SHARDED:
        why.append(f"vision tower: {heads} attention heads do not divide by {degree}")
    if width and width % degree:
        why.append(f"vision tower: MLP width {width} does not divide by {degree}")
    return why


_HEADS_NOT_SHARDED = {"internvl"}  # InternViT replicates its attention when the heads do not split (intern_vit.py)


def tp_alternatives(linears: dict[str, tuple[int, int]], heads: int, kv_heads: int, degree: int) -> list[str]:
    """The weight settings vLLM would load at ``degree``: group sizes Marlin takes (128, 64, 32), then per-channel.

    >>> tp_alternatives({"mlp.down_proj": (8192, 29568)}, 64, 8, 4)
    ['g32', 'per-channel']
    >>> tp_alternatives({"mlp.down_proj": (3584, 18944)}, 28, 4, 8)  # the heads do not split: nothing loads
    []
    """
    ok = [f"g{g}" for g in MARLIN_GROUP_SIZES if not tp_refusals(linears, heads, kv_heads, g, degree)]
    if not tp_refusals(linears, heads, kv_heads, None, degree):
        ok.append("per-channel")
    return ok


# ---------------------------------------------------------------- vision tokens


def vision_tokens(folder: Path, config, width: int, height: int) -> dict:
    """Image tokens of one ``width`` x ``height`` image, from the family's image-processor class and settings.

    The image processor is built from ``preprocessor_config.json`` (its PIL variant; no torchvision
    needed); the count follows the family's processor: dynamic resolution (Qwen), anyres tiles
    (OneVision), tiles + thumbnail with pixel shuffle (InternVL), tiles + global view with pixel
    shuffle (Idefics3, SmolVLM), or a fixed count (LLaVA-1.5, Gemma 3).
    """
    model_type = config.model_type
    rule = _VISION_RULES.get(model_type)
    if rule is None:
        raise QigError(
            f"no vision-token rule for model type {model_type!r}; pass the tokens per sample instead (--sample-tokens)"
        )
    processor = None
    if (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, ImportError) as exc:
            why = " ".join(str(exc).split())
            raise QigError(f"{folder / 'preprocessor_config.json'} cannot be loaded: {why}") from exc
    elif model_type not in ("llava", "gemma3"):
        raise QigError(
            f"{folder} has no preprocessor_config.json, which {model_type}'s image-token count depends on; "
            "add it from the checkpoint, or pass the tokens per sample (--sample-tokens)"
        )
    tokens, how = rule(processor, config, height, width)
    return {
        "image_size": [width, height],
        "tokens_per_image": int(tokens),
        "image_processor": type(processor).__name__ if processor is not None else None,
        "how": how,
    }


def _qwen(processor, config, height, width):
    patches = processor.get_number_of_image_patches(height, width, {})
    merge = processor.merge_size
    return patches // merge**2, f"{patches} patches of {processor.patch_size} px / {merge}x{merge} merge"


def _onevision(processor, config, height, width):
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    vision = config.vision_config
    stub = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)  # its token arithmetic, without a tokenizer
    stub.image_processor = processor
    stub.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
    stub.vision_aspect_ratio = config.vision_aspect_ratio
    side = processor.size["height"] if "height" in processor.size else processor.size["shortest_edge"]
    tokens = stub._get_number_of_features(height, width, side, side)
    if config.vision_feature_select_strategy == "default":
        tokens -= 1
    return tokens, f"anyres ({config.vision_aspect_ratio}): base {stub.num_image_tokens} + tiles + newlines"


def _internvl(processor, config, height, width):
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    kwargs = dict(InternVLProcessor.images_kwargs)  # the processor's own defaults: it crops to tiles
    tiles = processor.get_number_of_image_patches(height, width, kwargs)
    return tiles * config.image_seq_length, f"{tiles} tiles of 448 px (thumbnail included) x {config.image_seq_length}"


def _idefics(processor, config, height, width):
    vision = config.vision_config
    per_crop = int((vision.image_size // vision.patch_size) ** 2 / config.scale_factor**2)
    _, rows, cols = processor.get_number_of_image_patches(height, width, {})
    crops = rows * cols + 1
    return (
        per_crop * crops,
        f"{rows}x{cols} tiles + global view, {per_crop} tokens each (pixel shuffle {config.scale_factor})",
    )


def _llava(processor, config, height, width):
    vision = config.vision_config
    side = processor.crop_size["height"] if processor is not None else vision.image_size
    tokens = (side // vision.patch_size) ** 2 + (1 if vision.model_type == "clip_vision_model" else 0)
    if config.vision_feature_select_strategy == "default":
        tokens -= 1  # the CLS token is dropped
    return tokens, f"fixed: resized to {side} px, patch {vision.patch_size}"


def _gemma3(processor, config, height, width):
    return config.mm_tokens_per_image, "fixed: resized to 896 px, pooled to mm_tokens_per_image (pan-and-scan off)"


_VISION_RULES = {
    "qwen2_vl": _qwen,
    "qwen2_5_vl": _qwen,
    "qwen3_vl": _qwen,
    "llava_onevision": _onevision,
    "internvl": _internvl,
    "idefics3": _idefics,
    "smolvlm": _idefics,
    "llava": _llava,
    "gemma3": _gemma3,
}


# ---------------------------------------------------------------- the report


@dataclass
class Preflight:
    """What :func:`preflight` found; ``describe()`` for people, ``to_dict()`` for tests and JSON."""

    model: str
    model_class: str
    family: str
    n_layers: int
    dtype: str
    method: str
    setting: str
    settings: dict  # the config's fields that differ from the method's defaults (besides wbits, abits, group size)
    groups: list[dict]
    linears: dict[str, tuple[int, int]]
    group_size: int | None
    refusal: str | None
    working_group_sizes: list[int]
    tensor_parallel: dict[int, list[str]]  # everything vLLM refuses at each degree: decoder, then vision tower
    vision_tensor_parallel: dict[int, list[str]]  # the vision tower's part of it
    tensor_parallel_alternatives: dict[int, list[str]]
    serving: str
    vision: dict | None
    tokens_per_sample: int
    n_samples: int
    plan: MemoryPlan
    notes: list[str] = field(default_factory=list)

    @property
    def group_size_ok(self) -> bool:
        return self.refusal is None

    @property
    def fits(self) -> bool:
        return self.plan.on("device") <= (self.plan.device_free or 0)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "model_class": self.model_class,
            "family": self.family,
            "n_layers": self.n_layers,
            "dtype": self.dtype,
            "method": self.method,
            "setting": self.setting,
            "settings": self.settings,
            "groups": self.groups,
            "linears": {k: list(v) for k, v in self.linears.items()},
            "group_size": self.group_size,
            "group_size_ok": self.group_size_ok,
            "refusal": self.refusal,
            "working_group_sizes": self.working_group_sizes,
            "tensor_parallel": {
                d: {"ok": not why, "why": why, "loads_with": self.tensor_parallel_alternatives.get(d, [])}
                for d, why in self.tensor_parallel.items()
            },
            "serving": self.serving,
            "vision": self.vision,
            "tokens_per_sample": self.tokens_per_sample,
            "n_samples": self.n_samples,
            "memory_plan": {"items": dict(self.plan.items), "where": dict(self.plan.where)},
            "device_memory": self.plan.device_free,
            "device_peak": self.plan.on("device"),
            "fits": self.fits,
            "notes": self.notes,
        }

    def describe(self) -> str:
        lines = [
            f"{self.model}: {self.model_class} ({self.family} family), {self.n_layers} decoder layers, {self.dtype}",
            f"{self.method} {self.setting}" + "".join(f", {k}={v}" for k, v in self.settings.items()),
            "",
            "scale groups of a decoder layer:",
        ]
        for g in self.groups:
            shapes = ", ".join(f"{n} [{o}, {i}]" for n, (o, i) in g["linears"].items())
            lines.append(f"  {g['name']:<9} {g['prev']} -> {shapes}" + ("" if g["active"] else f"  {g['skipped']}"))
        lines += ["", "group size:"]
        if self.group_size is None:
            lines.append("  per-channel: nothing to divide")
        elif self.refusal:
            lines.append(f"  REFUSED: {self.refusal}")
        else:
            widths = sorted({i for _, i in self.linears.values()})
            groups = ", ".join(f"{w} = {w // self.group_size} x {self.group_size}" for w in widths)
            lines.append(f"  g{self.group_size} divides every quantized linear's input: {groups}")
        lines += ["", "vLLM tensor parallelism, shape rules (vLLM 0.32; see qig.preflight):"]
        lines.append(f"  {self.serving}")
        for degree, why in self.tensor_parallel.items():
            lines.append(f"  TP {degree}: " + ("ok" if not why else "refused: " + "; ".join(why)))
            other = self.tensor_parallel_alternatives.get(degree)
            if other:
                lines.append(f"        loads with {_or(other)} (or an intermediate width padded to whole groups)")
            if self.vision_tensor_parallel.get(degree):
                lines.append("        vision tower: vLLM's --mm-encoder-tp-mode data keeps it whole on every rank")
        lines += ["", "calibration:"]
        if self.vision:
            v = self.vision
            lines.append(
                f"  {v['image_size'][0]}x{v['image_size'][1]} image: {v['tokens_per_image']} vision tokens "
                f"({v['image_processor'] or 'no image processor needed'}; {v['how']})"
            )
        lines.append(f"  {self.n_samples} samples x {self.tokens_per_sample} tokens")
        lines += ["", self.plan.describe()]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {verdict}: device peak {gib(self.plan.on('device'))} of {gib(self.plan.device_free or 0)}")
        decoder = next(n for k, n in self.plan.items.items() if k.startswith("decoder layers"))
        lines.append(
            f"  host: about {gib(self.plan.on('host'))}, {gib(decoder)} of it the decoder layers, which "
            "--model-offload disk leaves on disk (auto does, past a quarter of the host's available memory)"
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def preflight(
    model_dir: str | os.PathLike,
    config: QuantConfig,
    n_samples: int | None = None,
    image_size: tuple[int, int] | None = DEFAULT_IMAGE_SIZE,
    tokens: int | None = None,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    device_memory: int = DEFAULT_DEVICE_MEMORY,
    offload_streams: str = "auto",
    revision: str | None = None,
) -> Preflight:
    """The dry run of ``config`` on the checkpoint in ``model_dir`` (see the module doc); reads no weights.

    image_size: (width, height) of one calibration image; each sample is one image plus
    ``text_tokens`` of text. tokens: the tokens per sample instead (image_size is then ignored).
    device_memory: bytes of the one GPU the plan is made for. model_dir may be a hub id
    (``revision``: its branch, tag or commit): only its JSON files are fetched (:func:`model_folder`).

        >>> report = preflight("path/to/Qwen2.5-VL-72B-Instruct", make_config("awq", wbits=4))  # doctest: +SKIP
        >>> print(report.describe())  # doctest: +SKIP
    """
    from qig.calib import DEFAULT_N_SAMPLES
    from qig.methods.base import method_for

    n_samples = _check_sizes(DEFAULT_N_SAMPLES if n_samples is None else n_samples, device_memory)
    folder = model_folder(model_dir, revision)
    model = build_meta_model(folder)
    family = family_for(model)
    layers = family.decoder_layers(model)
    layer = layers[0]
    linears = {n: (m.out_features, m.in_features) for n, m in quantized_linears(model, family).items()}
    widths = {n: i for n, (_, i) in linears.items()}
    group_size = config.group_size
    tp, alternatives, vision_tp = _tensor_parallel(model, model.config.get_text_config(), linears, config)
    vision, tokens = _sample_tokens(folder, model.config, image_size, tokens, text_tokens)
    plan = shape_plan(model, family, n_samples, tokens, config, method_for(config), device_memory, offload_streams)
    return Preflight(
        model=str(model_dir),
        model_class=type(model).__name__,
        family=family.name,
        n_layers=len(layers),
        dtype=str(next(layer.parameters()).dtype).removeprefix("torch."),
        method=config.name,
        setting=config.label(),
        settings=_other_settings(config),
        groups=_groups(family, layer),
        linears=linears,
        group_size=group_size,
        refusal=group_size_refusal(widths, group_size),
        working_group_sizes=working_group_sizes(list(widths.values())),
        tensor_parallel={d: tp[d] + vision_tp[d] for d in TP_DEGREES},
        vision_tensor_parallel=vision_tp,
        tensor_parallel_alternatives=alternatives,
        serving=_serving(config),
        vision=vision,
        tokens_per_sample=tokens,
        n_samples=n_samples,
        plan=plan,
        notes=_length_notes(tokens, vision is not None),
    )


def _check_sizes(n_samples: int, device_memory: int) -> int:
    if n_samples < 1:
        raise QigError(f"n_samples {n_samples} must be at least 1")
    if device_memory <= 0:
        raise QigError(f"device memory {device_memory} must be positive (bytes)")
    return n_samples


def _tensor_parallel(model, text, linears: dict[str, tuple[int, int]], config) -> tuple[dict, dict, dict]:
    """Per TP degree: why vLLM refuses the decoder's linears, what loads instead, and the vision tower's refusals."""
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    grouped = config.group_size is not None  # weight-only groups, and the W-A schemes with groups (W4AFP8, NVFP4)
    tp = {d: tp_refusals(linears, heads, kv_heads, config.group_size, d, grouped) for d in TP_DEGREES}
    alternatives = {d: tp_alternatives(linears, heads, kv_heads, d) for d, why in tp.items() if why and grouped}
    vision_tp = {d: vision_tp_refusals(model.config.vision_config, d, model.config.model_type) for d in TP_DEGREES}
    return tp, alternatives, vision_tp


def _groups(family: ModelFamily, layer: torch.nn.Module) -> list[dict]:
    """Every scale group of a decoder layer with its linears' shapes; an inactive one says why it is skipped."""
    groups = []
    for g in family.groups:
        active = g in family.active_groups(layer)
        entry = {
            "name": g.name,
            "prev": g.prev,
            "linears": {n: tuple(get_module(layer, n).weight.shape) for n in g.linears},
            "block": g.block,
            "active": active,
        }
        if not active:
            prev = tuple(get_module(layer, g.prev).weight.shape)
            first = tuple(get_module(layer, g.linears[0]).weight.shape)
            entry["skipped"] = f"(skipped: {g.prev} {list(prev)} and {g.linears[0]} {list(first)} differ, GQA)"
        groups.append(entry)
    return groups


def _sample_tokens(folder: Path, config, image_size, tokens: int | None, text_tokens: int) -> tuple[dict | None, int]:
    """(the vision tokens of one image at ``image_size``, or None when ``tokens`` is given; the tokens per sample)."""
    if tokens is not None:
        if tokens < 1:
            raise QigError(f"tokens per sample {tokens} must be at least 1")
        return None, tokens
    if image_size is None:
        raise QigError("give an image size (width x height) or the tokens per sample")
    width, height = image_size
    if width < 1 or height < 1:
        raise QigError(f"image size {width}x{height} must be positive")
    vision = vision_tokens(folder, config, width, height)
    return vision, vision["tokens_per_image"] + text_tokens


def _length_notes(tokens: int, images: bool) -> list[str]:
    """A note when a sample passes ``qig quantize``'s default token cap."""
    from qig.calib import DEFAULT_MAX_LENGTH

    if tokens <= DEFAULT_MAX_LENGTH:
        return []
    cut = "cut through the image tokens" if images else f"cut every sample to {DEFAULT_MAX_LENGTH} tokens"
    return [
        f"{tokens} tokens per sample pass qig quantize's default --max-length {DEFAULT_MAX_LENGTH}, which would "
        f"{cut}: pass --max-length {tokens} or more" + (" (or smaller images)" if images else "")
    ]


def _other_settings(config) -> dict:
    """The fields of ``config`` that differ from its method's defaults at the same wbits, abits and group size
    (and scheme).

    Nested settings show only what differs in them: ``gptq.damp``, ``token_weights`` as ``qig(steps=4)``.

    >>> from qig.methods.config import make_config
    >>> _other_settings(make_config("qig", wbits=3, steps=4, batch_size=8))
    {'batch_size': 8, 'steps': 4}
    >>> _other_settings(make_config("gptq", wbits=4, token_weights=make_config("qig", wbits=4, steps=4)))
    {'token_weights': 'qig(steps=4)'}
    """
    import dataclasses

    from qig.methods.config import QuantConfig

    default = type(config)(**{k: getattr(config, k) for k in ("wbits", "abits", "group_size", "scheme")})
    out = {}
    for f in dataclasses.fields(config):
        value, base = getattr(config, f.name), getattr(default, f.name)
        if value == base:
            continue
        if isinstance(value, QuantConfig):  # another method's config (GPTQ's token weights)
            inner = ", ".join(f"{k}={v}" for k, v in _other_settings(value).items())
            out[f.name] = f"{value.name}({inner})" if inner else value.name
        elif dataclasses.is_dataclass(value) and dataclasses.is_dataclass(base):
            for g in dataclasses.fields(value):
                if getattr(value, g.name) != getattr(base, g.name):
                    out[f"{f.name}.{g.name}"] = getattr(value, g.name)
        else:
            out[f.name] = value
    return dict(sorted(out.items()))


def _serving(config) -> str:
    """What vLLM 0.32 serves the compressed-tensors export of ``config`` with (``qig.export.scheme``)."""
    from qig.export.scheme import scheme_for

    try:
        return scheme_for(config.spec, config.act_spec).serving
    except QigError as exc:
        return f"no compressed-tensors export: {exc}"


def _or(values: list) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
