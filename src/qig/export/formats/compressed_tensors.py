"""``--format compressed-tensors``: packed integers that vLLM and transformers load.

The output is written by the ``compressed-tensors`` library
(``apply_quantization_config`` + ``ModelCompressor``): the decoder linears get
the scheme of ``qig.export.scheme``; the library quantizes the saved weights
with those scales and zero points (already folded: the search's scales live
in the weights), packs them, and the packed integers are checked against
qig's own codes (:meth:`CompressedTensors.stored_codes`, called by the
shared flow) before the folder is put in place.

Its ``ignore`` list is the family's regexes (``re:.*vision_tower.*``,
``re:.*multi_modal_projector.*``, ``re:.*lm_head`` for LLaVA), which match
the kept linears in transformers' names and in vLLM's.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from qig.errors import QigError
from qig.export.formats.base import ExportFormat, Written, register
from qig.export.params import QuantizedWeight, check_storable
from qig.export.scheme import Scheme, scheme_for
from qig.models.family import ModelFamily
from qig.quant.spec import QuantSpec, round_fp8
from qig.runs import CONFIG_KEY


@register
class CompressedTensors(ExportFormat):
    name = "compressed-tensors"
    help = "packed integers and a quantization_config (vLLM, transformers; the export extra)"

    def check(self, spec: QuantSpec, act_spec: QuantSpec | None = None, act_order: bool = False) -> None:
        scheme = scheme_for(spec, act_spec)
        if act_order:
            raise QigError(
                "GPTQ with --act-order permutes its groups' columns (g_idx), which compressed-tensors no longer "
                "stores; drop --act-order, or write --format fake-quant"
            )
        _require_library(scheme)

    def begin(self, model, *, family, run, linears, ignored) -> None:
        self.scheme = scheme_for(run.spec, run.act_spec)
        self.family, self.run, self.ignored = family, run, ignored
        if hasattr(model.config, CONFIG_KEY):
            # The fake-quant record would make 'qig eval' install its own activation quantizers on top of the
            # ones compressed-tensors installs at load; quantization_config describes the export instead.
            delattr(model.config, CONFIG_KEY)
        self.compressor = _attach(model, family, linears, self.scheme, ignored)

    @torch.no_grad()
    def write_layer(self, model, quantized) -> None:
        from compressed_tensors.compressors.base import compress_module

        for path, qw in quantized.items():
            check_storable(qw, path)
        nvfp4_inputs = self.run.act_spec is not None and self.run.act_spec.number == "nvfp4"
        for path, qw in quantized.items():
            mod = model.get_submodule(path)
            _set_params(mod, qw, self.scheme, _input_scale(self.run, path, self.family) if nvfp4_inputs else None)
            compress_module(mod, self.compressor.force_compression_format)

    def end(self, folder: Path) -> Written:
        _write_config(self.compressor, self.family, self.ignored, self.scheme, folder)
        return Written(self.scheme.format, self.scheme.serving)

    def stored_codes(self, module: torch.nn.Module, qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
        if qw.spec.is_float:
            return _float_codes(module, qw), qw.q
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        q, _ = qw.signed()
        if hasattr(module, "weight_packed"):  # pack-quantized; int-quantized keeps int8 in ``weight``
            stored = unpack_from_int32(module.weight_packed.data, qw.spec.bits, tuple(qw.q.shape))
        else:
            stored = module.weight.data
        return stored, q


def _float_codes(module: torch.nn.Module, qw: QuantizedWeight) -> torch.Tensor:
    """The float codes the module stores: FP8 in ``weight``, FP4 two to a byte in ``weight_packed``."""
    if qw.spec.number == "fp8":
        return module.weight.data.float()
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    rows, cols = qw.q.shape
    return unpack_fp4_from_uint8(module.weight_packed.data, rows, cols, dtype=torch.float32)


def _set_params(mod: torch.nn.Module, qw: QuantizedWeight, scheme: Scheme, input_scale: torch.Tensor | None) -> None:
    """Put qig's parameters where compressed-tensors reads them, as the values its compressor stores exactly."""
    spec = qw.spec
    scale = qw.scale.float()
    if spec.number == "nvfp4":
        scale = round_fp8(scale * qw.global_scale)  # back to the FP8 group scale: the effective one is fp8 / global
        _param(mod, "weight_global_scale", qw.global_scale.float().reshape(1))
    _param(mod, "weight_scale", scale.reshape(mod.weight_scale.shape).contiguous())  # float32: exact
    if hasattr(mod, "weight_zero_point"):
        if scheme.weights["symmetric"]:
            mod.weight_zero_point.zero_()
        else:
            _, zero = qw.signed()
            mod.weight_zero_point.copy_(zero.reshape(mod.weight_zero_point.shape))
    if input_scale is not None:
        _param(mod, "input_global_scale", input_scale.float().reshape(1))


def _param(mod: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(mod, name, torch.nn.Parameter(value, requires_grad=False))


def _input_scale(run, path: str, family: ModelFamily) -> torch.Tensor:
    """The calibrated NVFP4 activation scale the run stored for the decoder linear ``path``; refused if missing."""
    params = run.quantized.get(path.removeprefix(f"{family.layers}."), {})
    if "input_global_scale" not in params:
        raise QigError(
            f"{path}: the run stored no calibrated NVFP4 activation scale (input_global_scale); export the "
            "unchanged folder 'qig quantize' wrote, or re-run it with this qig"
        )
    return params["input_global_scale"]


def _require_library(scheme: Scheme | None = None) -> None:
    """The library is installed, and packs ``scheme``'s codes the way its readers (and vLLM) unpack them."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise QigError(
            "--format compressed-tensors needs the compressed-tensors library: pip install 'qig[export]'"
        ) from None
    if scheme is not None and scheme.format == "pack-quantized" and not packs_densely(scheme.weights["num_bits"]):
        bits = scheme.weights["num_bits"]
        raise QigError(
            f"compressed-tensors {compressed_tensors.__version__} packs {bits}-bit codes {32 // bits} to an int32 "
            f"word with padding, while compressed-tensors >= 0.18 and vLLM read {bits}-bit packs densely (32 codes "
            f"in {bits} words), so they would not read this export; install compressed-tensors>=0.18,<0.21 for "
            f"{bits}-bit weights (2, 4 and 8 bits pack alike in every version), or use --format fake-quant"
        )


def packs_densely(bits: int) -> bool:
    """Whether the installed compressed-tensors packs ``bits``-bit codes densely (32 codes in ``bits`` int32 words).

    compressed-tensors 0.18 to 0.20 pack densely; 0.17 (vLLM 0.32's pin) puts ``32 // bits`` codes in a word with
    padding. The two agree at 1, 2, 4 and 8 bits. Asked of the library itself, not of its version number.

    >>> packs_densely(4)  # doctest: +SKIP
    True
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(torch.zeros(1, 32, dtype=torch.int8), bits).shape[1] == bits


def ignore_list(family: ModelFamily, kept: Sequence[str], saved: Sequence[str] = ()) -> list[str]:
    """The export's ``ignore`` entries: the family's regexes, then by name every kept linear they miss.

    kept: the in-memory names of the linears left in full precision; saved: the
    names compressed-tensors wrote for them (the checkpoint's). A linear the
    regexes miss (a family without them, the naming fallback) is listed in
    memory, saved and serving names, so transformers and vLLM both match it.

    >>> from qig.models import FAMILIES
    >>> ignore_list(FAMILIES[0], ["model.vision_tower.encoder.layers.0.mlp.fc1", "lm_head"])
    ['re:.*vision_tower.*', 're:.*multi_modal_projector.*', 're:.*lm_head']
    """
    names = {n for n in (*kept, *saved) if not family.ignores(n)}
    names |= {family.serving_key(n) for n in names}
    return [*family.ignore, *sorted(names)]


def _attach(model, family: ModelFamily, linears: list[str], scheme: Scheme, ignored: list[str]):
    """Attach the scheme to exactly the decoder linears ``linears`` (they may be on the meta device); the compressor.

    compressed-tensors registers each linear's quantization parameters; :func:`_set_params` fills them with
    qig's, layer by layer, and the compressor packs the layer.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    decoder_ignored = sorted(p for p in linears if family.ignores(p))
    if decoder_ignored:
        raise QigError(
            f"the {family.name} family's ignore entries {list(family.ignore)} match decoder linears "
            f"(e.g. {decoder_ignored[0]}); fix the entry in qig/models/families.py"
        )
    config = QuantizationConfig(
        config_groups={"group_0": scheme.quantization_scheme(["Linear"])},
        ignore=ignore_list(family, ignored),
        format=scheme.format,
        quantization_status="frozen",
    )
    # compressed-tensors 0.20 draws a progress bar unless told not to; 0.17 (vLLM 0.32's pin) has no bar, no flag.
    takes_flag = "show_progress" in inspect.signature(apply_quantization_config).parameters
    quiet = {"show_progress": False} if takes_flag else {}
    apply_quantization_config(model, config, **quiet)
    attached = sorted(n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None)
    if attached != sorted(linears):
        extra = sorted(set(attached) ^ set(linears))[:3]
        raise QigError(f"the compressed-tensors scheme did not land on exactly the decoder linears (e.g. {extra})")
    return ModelCompressor.from_pretrained_model(model, scheme.format)


def _write_config(compressor, family: ModelFamily, ignored: list[str], scheme: Scheme, folder: Path) -> None:
    """The export's quantization_config into ``folder/config.json`` (the weights are saved already)."""
    # The library lists every kept linear by its checkpoint name; the family's regexes replace those names, so
    # the list matches transformers' in-memory names, the saved ones and vLLM's (see ignore_list).
    from compressed_tensors.quantization import QuantizationStatus

    qconfig = compressor.quantization_config
    qconfig.ignore = ignore_list(family, ignored, qconfig.ignore or [])
    qconfig.quantization_status = QuantizationStatus.COMPRESSED  # every decoder linear is (write_layer)
    compressor.update_config(folder)
    if scheme.format == "pack-quantized" and not scheme.weights["symmetric"]:
        # transformers + compressed-tensors cannot build packed zero points on the meta device (the tensors
        # load with the wrong shape), so asymmetric packs are dequantized at load there; vLLM ignores this key.
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"]["dequantize"] = True
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
