"""Reading compressed-tensors checkpoints (llm-compressor's, and qig's own exports) as fake-quant models.

A folder whose config.json holds a ``quantization_config`` with
``quant_method: compressed-tensors`` stores codes with their scales and zero
points: ``pack-quantized`` (codes packed in int32 words, weight-only W4A16 /
W8A16, group or channel), ``int-quantized`` (int8 codes, with per-token
dynamic activations: W8A8, W4A8), ``naive-quantized``, or the float formats
qig's ``--scheme`` writes (``float-quantized``: FP8; ``nvfp4-pack-quantized``;
``mxfp4-pack-quantized``). qig loads it as the fake-quant model it evaluates:

1. the model is built from the config without its quantization entry, and
   every tensor that is not quantized loads as usual (transformers' own
   renaming of legacy keys included);
2. each quantized linear's tensors are read from the shards on their own and
   decompressed by the ``compressed-tensors`` library (the decompressor its
   writers ship), one linear at a time, into its dense weight: the codes
   dequantized, which is what the fake-quant weight is;
3. a scheme with dynamic input activations qig quantizes alike (per-token
   int or FP8; NVFP4 groups of 16 with the stored per-tensor
   ``input_global_scale``; MXFP4 groups of 32) gets qig's activation
   quantizers on the linears it covers (``qig.quant.activation``), as a qig
   W-A folder does, so evaluation quantizes activations at run time.

What qig cannot hold that way (other float formats, sparsity, transforms, a
quantized KV cache, static or asymmetric activation scales, GPTQ's
activation-order index) is refused in one line, before any weight is read.
The library is the ``export`` extra (``pip install 'qig[export]'``).

    >>> is_compressed({"quantization_config": {"quant_method": "compressed-tensors"}})
    True
    >>> is_compressed({"qig_quantization": {"abits": 8}})
    False
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from qig.errors import QigError

log = logging.getLogger(__name__)

METHOD = "compressed-tensors"
INT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")  # integer codes the library decompresses
FLOAT_FORMATS = {"float-quantized": 8, "nvfp4-pack-quantized": 4, "mxfp4-pack-quantized": 4}  # -> weight bits
READABLE = (*INT_FORMATS, *FLOAT_FORMATS)
_DENSE_FIX = (
    "re-quantize it with an integer scheme (e.g. llm-compressor's W4A16, W8A16 or W8A8 presets), or dequantize it "
    "to a dense folder (compressed_tensors.entrypoints.convert: CompressedTensorsDequantizer) and pass that"
)


def is_compressed(config: dict) -> bool:
    """Whether a config.json (as a dict) describes a compressed-tensors checkpoint."""
    entry = config.get("quantization_config")
    return isinstance(entry, dict) and entry.get("quant_method") == METHOD


@dataclass(frozen=True)
class Group:
    """One config group of a compressed-tensors checkpoint, as qig reads it."""

    name: str
    scheme: object  # compressed_tensors.quantization.QuantizationScheme
    format: str  # one of READABLE
    act_spec: object = None  # qig's quantizer of the input activations (a QuantSpec); None: weight-only

    @property
    def abits(self) -> int:
        """Input activation bits; 16: weight-only."""
        return 16 if self.act_spec is None else self.act_spec.bits

    def describe(self) -> str:
        """The group's setting in words, e.g. 'W4A16 group 128 asym (pack-quantized)'."""
        w = self.scheme.weights
        size = f"group {w.group_size}" if w.strategy == "group" else str(w.strategy)
        return f"W{w.num_bits}A{self.abits} {size} {'sym' if w.symmetric else 'asym'} ({self.format})"


def read_groups(config: dict, path: Path) -> list[Group]:
    """The config groups of ``path``'s compressed-tensors ``quantization_config``, each checked readable."""
    _require_library()
    from compressed_tensors.quantization import QuantizationConfig

    where = f"{path / 'config.json'}: quantization_config"
    raw = config["quantization_config"]
    try:
        parsed = QuantizationConfig.model_validate({k: v for k, v in raw.items() if k != "quant_method"})
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        first = " ".join(str(exc).split())[:200]
        raise QigError(
            f"{where} is not a compressed-tensors config qig can read ({first}); the folder was not written by "
            "compressed-tensors or llm-compressor, or by a version qig does not know: re-save it with "
            "compressed-tensors>=0.17,<0.21"
        ) from exc
    _refuse_extras(raw, parsed, where)
    groups = [_group(name, scheme, parsed.format, where) for name, scheme in parsed.config_groups.items()]
    if not groups:
        raise QigError(f"{where} has no config_groups, so nothing in it is quantized; load it as a dense folder")
    return groups


def _refuse_extras(raw: dict, parsed, where: str) -> None:
    """Refuse what a fake-quant model cannot reproduce: sparsity, transforms, a quantized KV cache."""
    if raw.get("sparsity_config"):
        raise QigError(f"{where} has a sparsity_config (sparse weights), which qig does not read; {_DENSE_FIX}")
    if raw.get("transform_config"):
        raise QigError(
            f"{where} has a transform_config (rotated weights, e.g. SpinQuant or QuIP), which qig does not apply at "
            f"run time; {_DENSE_FIX}"
        )
    if getattr(parsed, "kv_cache_scheme", None) is not None:
        raise QigError(
            f"{where} quantizes the KV cache (kv_cache_scheme), which qig does not do at run time; "
            "quantize the checkpoint without kv_cache_scheme"
        )


def _group(name: str, scheme, top_format: str | None, where: str) -> Group:
    """One config group, checked: integer weights in a readable format, activations qig quantizes alike."""
    fmt = str(getattr(scheme.format, "value", scheme.format) or top_format or "")
    where = f"{where}.config_groups.{name}"
    if fmt not in READABLE:
        raise QigError(
            f"{where} stores weights as {fmt or 'an unnamed format'!r}; qig reads the formats "
            f"{', '.join(READABLE)}: {_DENSE_FIX}"
        )
    w = scheme.weights
    kind = "float" if fmt in FLOAT_FORMATS else "int"
    if w is None or _value(w.type) != kind or w.dynamic or (kind == "float" and w.num_bits != FLOAT_FORMATS[fmt]):
        weights = "no weights" if w is None else f"{_value(w.type)} {w.num_bits}-bit weights"
        raise QigError(
            f"{where} quantizes {weights}{' (dynamic)' if w is not None and w.dynamic else ''} in {fmt}; qig reads "
            f"static {kind} weights there: {_DENSE_FIX}"
        )
    if scheme.output_activations is not None:
        raise QigError(f"{where} quantizes output activations, which qig does not do; {_DENSE_FIX}")
    return Group(name, scheme, fmt, _activation_spec(scheme.input_activations, where))


def _value(field) -> str:
    return str(getattr(field, "value", field))


def _activation_spec(acts, where: str):
    """None without input activations; else qig's activation quantizer, when it quantizes them alike."""
    from qig.quant.spec import activation_spec

    if acts is None:
        return None
    strategy, kind, dynamic = _value(acts.strategy), _value(acts.type), _value(acts.dynamic)
    # (type, bits, strategy, group size, dynamic) -> qig's quantizer, as qig's schemes write them
    alike = {
        ("float", 8, "token", None, "True"): "fp8",
        ("float", 4, "tensor_group", 16, "local"): "nvfp4",
        ("float", 4, "group", 32, "True"): "mxfp4",
    }
    number = alike.get((kind, acts.num_bits, strategy, acts.group_size, dynamic))
    if number is not None and acts.symmetric:
        return activation_spec(acts.num_bits, number)
    if kind != "int" or not acts.symmetric or acts.dynamic is not True or strategy != "token" or acts.num_bits > 8:
        raise QigError(
            f"{where} quantizes input activations as {kind} {acts.num_bits}-bit {strategy} "
            f"{'symmetric' if acts.symmetric else 'asymmetric'} {'dynamic' if acts.dynamic is True else 'static'}; "
            "qig quantizes activations per token, symmetric, dynamic, int 4 or 8 bits or FP8 (e.g. the W8A8 and "
            f"FP8_DYNAMIC presets), or as NVFP4 / MXFP4 (groups of 16 / 32): {_DENSE_FIX}"
        )
    return activation_spec(acts.num_bits)


def _require_library() -> None:
    try:
        import compressed_tensors
    except ImportError:
        raise QigError(
            "this folder is a compressed-tensors checkpoint; reading it needs the compressed-tensors library: "
            "pip install 'qig[export]'"
        ) from None
    from compressed_tensors.compressors import BaseCompressor

    if not hasattr(BaseCompressor, "compression_param_names"):
        raise QigError(
            f"compressed-tensors {compressed_tensors.__version__} has no per-layer decompressor "
            "(BaseCompressor.compression_param_names); install compressed-tensors>=0.20,<0.21 to read this folder"
        )


@dataclass(frozen=True)
class Stored:
    """A quantized linear of the checkpoint: its config group, and its tensors (local name -> (shard, key))."""

    group: Group
    tensors: dict[str, tuple[Path, str]]


def load_compressed(path: Path, groups: list[Group], auto_model, dtype, trust_remote_code: bool = False):
    """``path``'s model with every quantized linear decompressed into its dense (fake-quant) weight.

    Returns the model and, for each decompressed linear (its name in the model), its config group and the
    per-tensor scale of its NVFP4 input activations (``input_global_scale``; None for other schemes).

    >>> groups = read_groups(config, path)  # doctest: +SKIP
    >>> model, linears = load_compressed(path, groups, AutoModelForImageTextToText, torch.float32)  # doctest: +SKIP
    """
    model = _dense_model(path, auto_model, dtype, trust_remote_code)
    stored = stored_linears(path, model, groups)
    input_scales = decompress_into(model, stored)
    counts: dict[str, int] = {}
    for s in stored.values():
        counts[s.group.describe()] = counts.get(s.group.describe(), 0) + 1
    log.info("%s: decompressed %s", path, ", ".join(f"{n} linears {d}" for d, n in counts.items()))
    return model, {name: (s.group, input_scales.get(name)) for name, s in stored.items()}


def _dense_model(path: Path, auto_model, dtype, trust_remote_code: bool) -> torch.nn.Module:
    """The model built from the config without its quantization entry; the unquantized tensors loaded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a dense model: the quantized linears are filled in next
    report = logging.getLogger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)  # it lists the packed tensors as unexpected and the packed weights as missing
    try:
        return auto_model.from_pretrained(
            path, config=config, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
        )
    finally:
        report.setLevel(level)


def stored_linears(path: Path, model: torch.nn.Module, groups: list[Group]) -> dict[str, Stored]:
    """Every linear the checkpoint stores quantized (it has a ``weight_scale``), by its name in ``model``.

    Checkpoint names become the model's the way transformers renames them while
    loading (e.g. LLaVA's legacy ``language_model.model.layers.0...``).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    from qig.models.checkpoint import read_header, shard_files

    by_module: dict[str, dict[str, tuple[Path, str]]] = {}
    for shard in shard_files(path):
        for key in read_header(shard):
            module, _, local = key.rpartition(".")
            by_module.setdefault(module, {})[local] = (shard, key)
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    state = model.state_dict()
    stored = {}
    for saved, tensors in by_module.items():
        if "weight_scale" not in tensors:
            continue
        if "weight_g_idx" in tensors:
            raise QigError(
                f"{path}: {saved} stores group indices (weight_g_idx, GPTQ's activation order), which "
                "compressed-tensors does not apply when it decompresses; quantize with actorder 'static' or none"
            )
        key, converted = rename_source_key(saved + ".weight", renamings, converters, model.base_model_prefix, state)
        if converted is not None or key not in state:
            raise QigError(
                f"{path}: {saved} holds quantized weights but the {type(model).__name__} built from its config has "
                "no such linear (or transformers merges it while loading); the checkpoint is of another model"
            )
        name = key[: -len(".weight")]
        stored[name] = Stored(_group_of(name, saved, model.get_submodule(name), groups, path), tensors)
    if not stored:
        raise QigError(
            f"{path}: its quantization_config is compressed-tensors' but no tensor has a weight_scale, so no weight "
            "is stored quantized; the folder is incomplete, or remove quantization_config to load it as dense"
        )
    return stored


def _group_of(name: str, saved: str, module: torch.nn.Module, groups: list[Group], path: Path) -> Group:
    """The config group whose targets match the linear (by its model name, its checkpoint name or its class)."""
    if len(groups) == 1:
        return groups[0]
    from compressed_tensors.utils.match import is_match

    for group in groups:
        if is_match(name, module, group.scheme.targets) or is_match(saved, module, group.scheme.targets):
            return group
    raise QigError(
        f"{path}: {saved} holds quantized weights but no config group's targets match it; the quantization_config "
        "does not describe this checkpoint"
    )


@torch.no_grad()
def decompress_into(model: torch.nn.Module, stored: dict[str, Stored]) -> dict[str, torch.Tensor]:
    """Decompress each stored linear with the library, one at a time, into the model's dense weight.

    Returns the stored ``input_global_scale`` [1] of the linears that have one (NVFP4 activations).
    """
    from contextlib import ExitStack

    from compressed_tensors.compressors import BaseCompressor
    from safetensors import safe_open

    input_scales = {}
    with ExitStack() as stack:
        files: dict[Path, object] = {}

        def read(shard: Path, key: str) -> torch.Tensor:
            if shard not in files:
                files[shard] = stack.enter_context(safe_open(shard, "pt"))
            tensor = files[shard].get_tensor(key)
            return tensor.float() if tensor.is_floating_point() else tensor  # scales: dequantized in float32

        for name, s in stored.items():
            compressor = BaseCompressor.get_value_from_registry(s.group.format)
            wanted = compressor.compression_param_names(s.group.scheme)
            missing = [p for p in wanted if p not in s.tensors]
            if missing:
                raise QigError(
                    f"{name}: the checkpoint lacks {missing[0]}, which {s.group.format} {s.group.describe()} needs; "
                    "the folder is incomplete or its quantization_config does not describe it"
                )
            weight = compressor.decompress({p: read(*s.tensors[p]) for p in wanted}, s.group.scheme)["weight"]
            target = model.get_submodule(name).weight
            if tuple(weight.shape) != tuple(target.shape):
                raise QigError(
                    f"{name}: decompressed to {tuple(weight.shape)}, the model's weight is {tuple(target.shape)}; "
                    "the checkpoint is of another model"
                )
            target.copy_(weight)
            if "input_global_scale" in s.tensors:
                input_scales[name] = read(*s.tensors["input_global_scale"]).reshape(1)
    return input_scales
