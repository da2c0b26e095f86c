"""Loading a model and its processor: the one place every command, benchmark and exporter loads one.

    >>> from qig.loading import load_model_and_processor
    >>> model, processor = load_model_and_processor("path/to/llava")  # doctest: +SKIP
    >>> model, processor = load_model_and_processor()  # the embedded model  # doctest: +SKIP

A folder written by ``save_pretrained``, or a hub id resolved through the
Hugging Face cache (``qig.hub``: downloaded when online, from the cache when
offline); it must hold a vision-language model. A weight-activation model folder (``qig quantize
--abits 8``: its config.json has a ``qig_quantization`` entry with ``abits``
below 16) is loaded with its per-token activation quantizers re-installed on
the decoder linears, so it runs with activations really quantized. A
compressed-tensors folder (llm-compressor's, or ``qig export``'s) is
decompressed linear by linear into its fake-quant weights, with qig's
activation quantizers on the linears its scheme quantizes the inputs of
(``qig.compressed``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qig.errors import QigError
from qig.models.checkpoint import STREAMED

log = logging.getLogger(__name__)


def load_model_and_processor(
    model_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    activation_quantizers: bool = True,
    decoder: str = "memory",
    revision: str | None = None,
):
    """Load an LVLM and its processor from a folder or a hub id (``qig.hub``); default: the embedded model.

    dtype: the weights' dtype, or "auto" for the checkpoint's own.
    decoder: "memory" loads every weight; "disk" loads everything but the decoder
    layers, which stay on the meta device and are read from the checkpoint's
    shards one at a time while ``qig.quantize`` runs (host memory: the rest of the
    model and a layer; see :func:`load_streamed`).
    A folder that ships its own modelling code (``auto_map`` in config.json, e.g.
    InternVL2) is loaded only with ``trust_remote_code=True``.

    A W-A quantized folder gets its activation quantizers back (see the module
    doc), unless ``activation_quantizers=False`` (the saved weights as they are,
    e.g. for export).

    >>> model, processor = load_model_and_processor("out/qig-w4a8")  # doctest: +SKIP
    >>> model, processor = load_model_and_processor("Qwen/Qwen2-VL-2B-Instruct", revision="main")  # doctest: +SKIP
    """
    from qig.hub import resolve_model

    if decoder not in ("memory", "disk"):
        raise QigError(f"decoder={decoder!r}: use 'memory' (load every weight) or 'disk' (stream the layers)")
    path = resolve_model(model_dir, revision, trust_remote_code).path
    config = read_vlm_config(path, trust_remote_code)
    groups = _compressed_groups(config, path, decoder)
    model, processor, quantized = _from_pretrained(path, config, dtype, decoder, trust_remote_code, groups)
    if activation_quantizers:
        from qig.quant.activation import install_activation_quantizer_

        for spec, out in _activation_quantizers(model, config, path, quantized).items():
            for module, scale in out:
                install_activation_quantizer_(module, spec, scale)
            log.info(
                "%s: W-A model, activations quantized at run time (%s) on %d linears", path, spec.label(), len(out)
            )
    if decoder == "disk":
        if torch.device(device).type != "cpu":
            raise QigError("decoder='disk' loads the model on the CPU; the pipeline brings each layer to the device")
        return model.eval(), processor
    return model.to(device).eval(), processor


def read_vlm_config(path: Path, trust_remote_code: bool = False) -> dict:
    """``path/config.json``, refused in one line unless it is a vision-language model qig may load."""
    if not path.is_dir():
        problem = "is a file, not a folder" if path.exists() else "does not exist"
        raise QigError(
            f"model folder {path} {problem}; pass --model with a folder written by save_pretrained or a hub id"
        )
    if not (path / "config.json").is_file():
        raise QigError(f"{path} has no config.json; it is not a transformers model folder")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QigError(f"{path / 'config.json'} is not valid JSON ({exc}); the model folder is corrupt") from exc
    if "vision_config" not in config:
        raise QigError(
            f"{path} holds a {config.get('model_type', 'unknown')!r} model without a vision tower; "
            "qig needs a vision-language model (e.g. llava, qwen2_vl, idefics3)"
        )
    auto_map = config.get("auto_map") or {}
    if auto_map and not trust_remote_code:
        raise QigError(
            f"{path} ships its own modelling code ({', '.join(sorted(set(auto_map.values())))}); qig runs it only "
            "with --trust-remote-code (read that code first), or use an HF-native conversion of the checkpoint"
        )
    return config


def _compressed_groups(config: dict, path: Path, decoder: str) -> list | None:
    """A compressed-tensors folder's config groups, checked readable before any weight is read (None: not one)."""
    from qig.compressed import is_compressed, read_groups

    if not is_compressed(config):
        return None
    groups = read_groups(config, path)
    if decoder == "disk":
        raise QigError(
            f"{path} is a compressed-tensors checkpoint, decompressed while it loads; its decoder layers cannot be "
            "streamed from disk: load the whole model (--model-offload none)"
        )
    return groups


def _from_pretrained(path: Path, config: dict, dtype, decoder: str, trust_remote_code: bool, groups=None):
    """transformers' model and processor of ``path``, and its decompressed linears (name -> config group; empty
    unless ``groups``, a compressed-tensors folder's, see ``qig.compressed``); failures as one-line errors."""
    from safetensors import SafetensorError
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qig.compressed import load_compressed

    auto_map = config.get("auto_map") or {}
    auto_model = AutoModelForImageTextToText
    if auto_map and "AutoModelForImageTextToText" not in auto_map:
        from transformers import AutoModel as auto_model
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        quantized = {}
        if groups is not None:
            model, quantized = load_compressed(path, groups, auto_model, dtype, trust_remote_code)
        elif decoder == "disk":
            model = load_streamed(path, auto_model, dtype, trust_remote_code)
        else:
            model = auto_model.from_pretrained(
                path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
            )
    except QigError:
        raise
    except ImportError as exc:  # e.g. a processor that needs torchvision
        raise QigError(
            f"could not load the model in {path}: a package it needs is missing ({' '.join(str(exc).split())}); "
            "install it (for torchvision: the build that matches your torch) and run again"
        ) from exc
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise QigError(f"could not load the model in {path}: {exc.__class__.__name__}: {exc}") from exc
    return model, processor, quantized


def load_streamed(path: Path, auto_model, dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model without its decoder layers' weights: those stay on the meta device, indexed on disk.

    transformers loads the model from a config with no decoder layers (every
    other weight, converted as usual); the layers are built on the meta device
    from the full config and put in place; the config is the full one again.
    ``model.qig_checkpoint`` (a ``qig.models.checkpoint.CheckpointIndex``) says
    where each layer's tensors are. The pipeline reads a layer when it gets to it.
    """
    import copy

    from transformers import AutoConfig

    from qig.hostmem import map_large_blocks
    from qig.models import family_for, get_module
    from qig.models.checkpoint import CheckpointIndex

    map_large_blocks()  # layers come and go: keep their buffers out of a heap that would grow with the depth

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    bare = copy.deepcopy(config)
    bare.get_text_config().num_hidden_layers = 0  # layer_types keep their length: modules built from them
    report = logging.getLogger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)  # it lists every decoder tensor as "unexpected": they are, for this config
    try:
        model = auto_model.from_pretrained(
            path, config=bare, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
        )
    finally:
        report.setLevel(level)
    with torch.device("meta"):
        full = type(model)._from_config(config, dtype=model.dtype)
    family = family_for(full)
    parent, _, name = family.layers.rpartition(".")
    setattr(get_module(model, parent), name, get_module(full, family.layers))
    model.config.get_text_config().num_hidden_layers = config.get_text_config().num_hidden_layers
    buffers = [n for n, _ in family.decoder_layers(model)[0].named_buffers()]
    if buffers:
        raise QigError(
            f"{path}: the {family.name} decoder layers hold buffers ({', '.join(buffers)}) a checkpoint does not "
            "store, so they cannot be streamed from disk; load the whole model (--model-offload none)"
        )
    index = CheckpointIndex.read(path, model, full.state_dict(), family.layers)
    setattr(model, STREAMED, index)
    return model


def _activation_quantizers(model, config: dict, path: Path, quantized: dict) -> dict:
    """The linears whose inputs the saved model quantizes at run time, by activation quantizer (empty: weight-only).

    Per quantizer (a ``QuantSpec``) a list of (linear, its NVFP4 per-tensor scale or None). A compressed-tensors
    folder: the linears of its groups with input activations, with the scales it stores; a qig W-A folder: the
    decoder linears, with the bits, number and scales its config.json records.
    """
    from qig.quant.spec import activation_spec

    out: dict = {}
    if quantized:
        for name, (group, scale) in quantized.items():
            if group.act_spec is not None:
                out.setdefault(group.act_spec, []).append((model.get_submodule(name), scale))
        return out
    abits = _saved_abits(config, path)
    if abits == 16:
        return {}
    from qig.models import family_for

    number, scales = _saved_activation_number(config, path)
    family = family_for(model)
    linears = family.decoder_linears(model)
    missing = [p for p in linears if number == "nvfp4" and p.removeprefix(f"{family.layers}.") not in scales]
    if missing:
        raise QigError(
            f"{path / 'config.json'}: NVFP4 activations without a calibrated scale for {missing[0]}; "
            "re-run qig quantize"
        )
    spec = activation_spec(abits, number)
    return {
        spec: [
            (lin, torch.tensor([scales[p.removeprefix(f"{family.layers}.")]]) if number == "nvfp4" else None)
            for p, lin in linears.items()
        ]
    }


def _saved_activation_number(config: dict, path: Path) -> tuple[str, dict[str, float]]:
    """The activation number format ``qig quantize --scheme`` recorded ("int" if none), and NVFP4's per-linear
    calibrated scales by ``"<layer>.<linear>"`` (empty otherwise)."""
    from qig.quant.spec import NUMBERS
    from qig.runs import CONFIG_KEY

    entry = config.get(CONFIG_KEY)
    if not isinstance(entry, dict):
        return "int", {}
    number = entry.get("activation_number") or "int"
    scales = entry.get("input_global_scales") or {}
    if number not in NUMBERS or not isinstance(scales, dict):
        raise QigError(
            f"{path / 'config.json'}: {CONFIG_KEY}.activation_number {number!r} is not one of {', '.join(NUMBERS)} "
            "(or input_global_scales is not a mapping); re-run qig quantize"
        )
    return number, scales


def _saved_abits(config: dict, path: Path) -> int:
    """The activation bits recorded by ``qig quantize`` in config.json (16 when none are recorded)."""
    from qig.runs import CONFIG_KEY

    entry = config.get(CONFIG_KEY)
    if entry is None:
        return 16
    abits = entry.get("abits", 16) if isinstance(entry, dict) else None
    if not isinstance(abits, int) or isinstance(abits, bool) or not 4 <= abits <= 16:
        raise QigError(
            f"{path / 'config.json'}: {CONFIG_KEY}.abits must be an integer from 4 to 16, got {abits!r}; "
            "re-run qig quantize, or remove the entry to load the weights without activation quantization"
        )
    return abits


def activation_note(model) -> str | None:
    """How the model quantizes its activations at run time, in words; None when it does not."""
    from qig.quant.activation import activation_quantization

    found = activation_quantization(model)
    if found is None:
        return None
    spec, n = found
    return f"activations quantized at run time: per-token symmetric {spec.bits}-bit on {n} decoder linears"


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def checkpoint_dtype(model_dir: str | os.PathLike | None = None) -> torch.dtype:
    """The floating dtype most of a checkpoint's weights are stored in (its safetensors headers); float32 if none.

    >>> checkpoint_dtype()  # the embedded model ships in float16
    torch.float16
    """
    from collections import Counter

    from qig.embedded import default_model_dir
    from qig.models.checkpoint import read_header

    path = Path(model_dir) if model_dir is not None else default_model_dir()
    counts: Counter[str] = Counter()
    for shard in sorted(path.glob("*.safetensors")):
        for entry in read_header(shard).values():
            if entry.get("dtype") in _SAFETENSORS_DTYPES:
                counts[_SAFETENSORS_DTYPES[entry["dtype"]]] += 1
    return DTYPES[counts.most_common(1)[0][0]] if counts else torch.float32


def resolve_dtype(name: str, model_dir: str | os.PathLike | None = None) -> torch.dtype:
    """``--dtype``: "auto" is the source checkpoint's dtype (:func:`checkpoint_dtype`), else the named one."""
    if name == "auto":
        return checkpoint_dtype(model_dir)
    if name not in DTYPES:
        raise QigError(f"dtype {name!r} is not supported; use auto or one of: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class LoadPlan:
    """How a run loads its model: the dtype it computes in, the dtype it saves in, and where the decoder lives."""

    compute: torch.dtype
    save: torch.dtype
    decoder: str  # "memory" or "disk" (read one layer at a time; see load_streamed)

    def describe(self) -> str:
        where = "read from disk" if self.decoder == "disk" else "in memory"
        return f"model in {self.compute} (saved in {self.save}), decoder layers {where}"


def load_plan(dtype: str, model_dir: str | os.PathLike | None, device: str, offload: str = "none") -> LoadPlan:
    """``--dtype`` and ``--model-offload`` for the checkpoint in ``model_dir`` on ``device``.

    dtype "auto": the checkpoint's, except float16 on a CPU device, which is
    computed in float32 (CPUs have no fast float16 kernels: ~10x slower,
    measured on the embedded model) and saved in float16; bfloat16 runs fast
    on CPUs as it is. offload "auto": the decoder is read from disk when the
    checkpoint passes a quarter of the available host memory.

    >>> load_plan("auto", None, "cpu").describe()  # the embedded model is stored in float16
    'model in torch.float32 (saved in torch.float16), decoder layers in memory'
    """
    if dtype != "auto":
        compute = save = resolve_dtype(dtype, model_dir)
    else:
        save = checkpoint_dtype(model_dir)
        compute = torch.float32 if save == torch.float16 and torch.device(device).type == "cpu" else save
    return LoadPlan(compute, save, _decoder_place(offload, model_dir))


def _decoder_place(choice: str, model_dir: str | os.PathLike | None) -> str:
    if choice not in ("auto", "disk", "none"):
        raise QigError(f"model_offload {choice!r}: use auto, disk or none")
    if choice in ("disk", "none"):
        return "disk" if choice == "disk" else "memory"
    from qig.embedded import default_model_dir
    from qig.models.checkpoint import read_header, shard_files

    folder = Path(model_dir) if model_dir is not None else default_model_dir()
    size = 0
    for shard in shard_files(folder):
        size += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in read_header(shard).values())
    available = _available_memory()
    place = "disk" if available is not None and size > available / 4 else "memory"
    log.debug("checkpoint %s: %d bytes, %s bytes available: decoder in %s", folder, size, available, place)
    return place


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
