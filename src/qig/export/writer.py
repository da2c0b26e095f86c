"""Export a ``qig quantize`` output folder as compressed-tensors or as a plain fake-quant checkpoint.

    >>> from qig.export import export
    >>> export("out/qig-w4", "out/qig-w4-ct", fmt="compressed-tensors")  # doctest: +SKIP

Everything that can be refused is checked before a file is written: the run's
setting must be one the format holds, and every decoder linear's saved
weights must dequantize exactly from the integers that will be stored (see
``qig.export.params``). The output is written to a temporary sibling folder
and renamed into place, so a failed export leaves nothing behind.

The integers come from the quantizer parameters the run kept
(``search.safetensors``, ``qig.quant.stored``): every qig quantizer, RTN and
GPTQ, stores each linear's scale and zero point. Folders without them
(written by an older qig, or by another tool) fall back to reading the grid
back from the weights (``qig.export.params.recover``).

compressed-tensors output is written by the ``compressed-tensors`` library
(``apply_quantization_config`` + ``ModelCompressor``): the decoder linears get
the scheme of ``qig.export.scheme``; the library quantizes the saved weights
with those scales and zero points (already folded: the search's scales live
in the weights), packs them, and the packed integers are checked against
qig's own codes before anything is saved.

Every export is saved in its family's serving key layout
(``qig.models.layout``, e.g. ``vision_tower.vision_model.*`` for a SigLIP
tower), and its ``ignore`` list is the family's regexes
(``re:.*vision_tower.*``, ``re:.*multi_modal_projector.*``, ``re:.*lm_head``
for LLaVA), which match the kept linears in transformers' names and in vLLM's.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qig.errors import QigError
from qig.export.params import QuantizedWeight, check_storable, from_params, recover
from qig.export.scheme import Scheme, scheme_for
from qig.fileio import atomic_dir, check_output_dir, temp_dir_beside
from qig.loading import DTYPES, load_model_and_processor
from qig.models.family import ModelFamily
from qig.models.layout import save_model
from qig.quant import stored
from qig.quant.spec import QuantSpec
from qig.runs import CONFIG_KEY, RUN_FILES, RUN_SUBDIR, SEARCH_TENSORS, config_from_dict, read_search_config, run_file

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "fake-quant")


@dataclass
class Run:
    """What ``qig quantize`` left in a folder: the saved config, its weight spec and activation bits, the quantizer
    parameters per ``"<layer>.<linear>"`` (``{scale, zero[, g_idx]}``; empty for folders that kept none)."""

    path: Path
    config: dict
    spec: QuantSpec
    abits: int
    quantized: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass
class ExportResult:
    """Where the export went and what it holds (for the CLI's summary and the size benchmark)."""

    path: Path
    format: str
    scheme: Scheme | None
    linears: list[str]
    ignored: list[str]


def read_run(path: str | os.PathLike) -> Run:
    """The quantize run in ``path``: its config from search.json and the stored quantizer parameters, validated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise QigError(f"--input {path} is not a folder; pass the --output folder of 'qig quantize'")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise QigError(f"{path} has no config.json; pass the --output folder of 'qig quantize'")
    try:
        model_config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise QigError(f"{cfg_file} is not valid JSON: {exc}") from exc
    if "quantization_config" in model_config:
        method = model_config["quantization_config"].get("quant_method", "a quantization method")
        raise QigError(f"{path} is already a {method} checkpoint; export the fake-quant folder 'qig quantize' wrote")
    saved = read_search_config(path)
    if saved is None:
        raise QigError(
            f"{path} has no search.json, so its quantization setting is unknown; pass the --output folder of "
            "'qig quantize' (it writes search.json next to the model)"
        )
    config = config_from_dict(saved)
    quantized = {}
    tensors_file = run_file(path, SEARCH_TENSORS)
    if tensors_file is not None:
        try:
            quantized = stored.from_tensors(load_file(tensors_file))
        except (SafetensorError, OSError) as exc:
            raise QigError(f"{tensors_file} is not a readable safetensors file: {exc}") from exc
    abits = int(saved.get("abits", 16))
    return Run(path=path, config=saved, spec=config.spec, abits=abits, quantized=quantized)


def decoder_linears(model: torch.nn.Module) -> dict[str, tuple[str, torch.nn.Linear]]:
    """The linears qig quantizes (every Linear of every decoder layer), by model path: (stored key, module)."""
    from qig.models import family_for

    family = family_for(model)
    return {path: (path.removeprefix(f"{family.layers}."), mod) for path, mod in family.decoder_linears(model).items()}


def codes(run: Run, model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    """Per decoder linear (model path) its exact integer codes and parameters; refuses what cannot be exported."""
    linears = decoder_linears(model)
    if not linears:
        raise QigError("the model has no decoder linears to export")
    if not run.quantized:
        log.info(
            "%s keeps no quantizer parameters (an older qig wrote it); reading the grid from the weights", run.path
        )
        return {path: recover(mod.weight.data, run.spec, path) for path, (_, mod) in linears.items()}
    out = {}
    for path, (key, mod) in linears.items():
        params = run.quantized.get(key)
        if params is None or not {"scale", "zero"} <= params.keys():
            raise QigError(
                f"{run.path / 'search.safetensors'} keeps quantizer parameters, but none (scale and zero) for {path} "
                f"(key {stored.PREFIX}{key}); export the unchanged folder 'qig quantize' wrote"
            )
        if "g_idx" in params:
            raise QigError(
                f"{path} was quantized by GPTQ with --act-order, whose groups follow a column permutation "
                "(g_idx); compressed-tensors no longer stores group act-order, so re-run GPTQ without --act-order "
                "or export with --format fake-quant"
            )
        out[path] = from_params(mod.weight.data, params["scale"], params["zero"], run.spec, path)
    return out


def export(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    fmt: str = "compressed-tensors",
    overwrite: bool = False,
    dtype: str | None = None,
) -> ExportResult:
    """Export the ``qig quantize`` folder ``input_dir`` to ``output_dir`` in format ``fmt`` (see FORMATS).

    dtype: "float32", "float16" or "bfloat16" for the unquantized parts and the
    activations; None keeps the checkpoint's (qig quantize writes the source's dtype).
    Scales are stored in float32 so the dequantized weights are exact.
    """
    if fmt not in FORMATS:
        raise QigError(f"format {fmt!r} is not supported; use one of: {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise QigError(f"dtype {dtype!r} is not supported; use one of: {', '.join(DTYPES)}")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    run = read_run(input_dir)
    scheme = scheme_for(run.spec, run.abits) if fmt == "compressed-tensors" else None
    if scheme is not None:
        _require_library(scheme)
    model, processor = load_model_and_processor(run.path, dtype="auto", activation_quantizers=False)
    from qig.models import family_for

    family = family_for(model)
    quantized = codes(run, model)
    if scheme is not None:
        for path, qw in quantized.items():
            check_storable(qw, path)
    if dtype is not None:
        model.to(DTYPES[dtype])
    if scheme is not None and hasattr(model.config, CONFIG_KEY):
        # The fake-quant record would make 'qig eval' install its own activation quantizers on top of the
        # ones compressed-tensors installs at load; quantization_config describes the export instead.
        delattr(model.config, CONFIG_KEY)
    ignored = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized)

    with atomic_dir(output_dir, overwrite) as tmp:
        if scheme is None:
            with torch.no_grad():
                for path, qw in quantized.items():
                    mod = model.get_submodule(path)
                    mod.weight.copy_(qw.dequantize(mod.weight.dtype))
            save_model(model, tmp, family)
        else:
            _write_compressed(model, family, quantized, scheme, ignored, tmp)
        processor.save_pretrained(tmp)  # tokenizer, processor config, chat template
        (tmp / RUN_SUBDIR).mkdir()
        for name in RUN_FILES:
            source = run_file(run.path, name)
            if source is not None:
                shutil.copyfile(source, tmp / RUN_SUBDIR / name)
    if scheme is not None:
        log.info("%s: %s", scheme.format, scheme.serving)
    return ExportResult(output_dir, fmt, scheme, sorted(quantized), ignored)


def check_format(fmt: str, spec: QuantSpec, abits: int = 16, act_order: bool = False) -> None:
    """Refuse, before any work, a format that cannot hold the setting (``qig quantize --format`` calls it).

    act_order: the run is GPTQ with act-order, whose groups compressed-tensors cannot store.
    """
    if fmt not in FORMATS:
        raise QigError(f"format {fmt!r} is not supported; use one of: {', '.join(FORMATS)}")
    if fmt == "compressed-tensors":
        scheme = scheme_for(spec, abits)
        if act_order:
            raise QigError(
                "GPTQ with --act-order permutes its groups' columns (g_idx), which compressed-tensors no longer "
                "stores; drop --act-order, or write --format fake-quant"
            )
        _require_library(scheme)


def export_after(write_run, output_dir: str | os.PathLike, fmt: str, overwrite: bool = False) -> Path:
    """``write_run(folder)`` writes a quantize run into a temporary folder; export it to ``output_dir``, drop it.

    ``qig quantize --format`` uses this: the run's files end up in ``output_dir/qig/``.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    tmp = temp_dir_beside(output_dir)
    try:
        write_run(tmp / "run")
        return export(tmp / "run", output_dir, fmt, overwrite=overwrite).path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


@torch.no_grad()
def _write_compressed(
    model, family: ModelFamily, quantized: dict[str, QuantizedWeight], scheme: Scheme, ignored: list[str], tmp: Path
):
    """Attach the scheme to the decoder linears, set the stored parameters, compress, check, save."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    decoder_ignored = sorted(p for p in quantized if family.ignores(p))
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
    if attached != sorted(quantized):
        extra = sorted(set(attached) ^ set(quantized))[:3]
        raise QigError(f"the compressed-tensors scheme did not land on exactly the decoder linears (e.g. {extra})")
    for path, qw in quantized.items():
        mod = model.get_submodule(path)
        q, zero = qw.signed()
        scale = qw.scale.reshape(mod.weight_scale.shape)
        mod.weight_scale = torch.nn.Parameter(scale.float().contiguous(), requires_grad=False)  # float32: exact
        if hasattr(mod, "weight_zero_point"):
            if scheme.weights["symmetric"]:
                mod.weight_zero_point.zero_()
            else:
                mod.weight_zero_point.copy_(zero.reshape(mod.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, scheme.format)
    compressor.compress_model(model)
    _check_packed(model, quantized, scheme)
    save_model(model, tmp, family)
    # The library lists every kept linear by its checkpoint name; the family's regexes replace those names, so
    # the list matches transformers' in-memory names, the saved ones and vLLM's (see ignore_list).
    qconfig = compressor.quantization_config
    qconfig.ignore = ignore_list(family, ignored, qconfig.ignore or [])
    compressor.update_config(tmp)
    if scheme.format == "pack-quantized" and not scheme.weights["symmetric"]:
        # transformers + compressed-tensors cannot build packed zero points on the meta device (the tensors
        # load with the wrong shape), so asymmetric packs are dequantized at load there; vLLM ignores this key.
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"]["dequantize"] = True
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _check_packed(model, quantized: dict[str, QuantizedWeight], scheme: Scheme) -> None:
    """The integers the library stored must be qig's codes, exactly."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    for path, qw in quantized.items():
        mod = model.get_submodule(path)
        q, _ = qw.signed()
        if scheme.format == "pack-quantized":
            stored = unpack_from_int32(mod.weight_packed.data, qw.spec.bits, tuple(qw.q.shape))
        else:
            stored = mod.weight.data
        if stored.shape != q.shape or not torch.equal(stored.to(torch.int8), q):
            raise QigError(f"{path}: compressed-tensors stored other integers than qig's codes; please report this")
