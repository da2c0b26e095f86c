"""Export a ``qig quantize`` output folder in a registered format (``qig.export.formats``).

    >>> from qig.export import export
    >>> export("out/qig-w4", "out/qig-w4-ct", fmt="compressed-tensors")  # doctest: +SKIP

The flow is shared by every format: read the run, load its model, compute
every decoder linear's exact integer codes, hand them to the format's
``write``, add the processor and the run files. Everything that can be
refused is checked before a file is written: the run's setting must be one
the format holds (its ``check``), and every decoder linear's saved weights must
dequantize exactly from the integers that will be stored (see
``qig.export.params``). The output is written to a temporary sibling folder
and renamed into place, so a failed export leaves nothing behind; before that,
the integers a format stored are compared with qig's codes.

The integers come from the quantizer parameters the run kept
(``search.safetensors``, ``qig.quant.stored``): every qig quantizer, RTN and
GPTQ, stores each linear's scale and zero point. Folders without them
(written by an older qig, or by another tool) fall back to reading the grid
back from the weights (``qig.export.params.recover``).

Every export is saved in its family's serving key layout
(``qig.models.layout``, e.g. ``vision_tower.vision_model.*`` for a SigLIP
tower).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from qig.errors import QigError
from qig.export.formats import ExportFormat, format_for
from qig.export.formats.base import Run
from qig.export.params import QuantizedWeight, from_params, recover
from qig.fileio import atomic_dir, check_output_dir, temp_dir_beside
from qig.loading import DTYPES, load_model_and_processor
from qig.models import linears
from qig.quant import stored
from qig.quant.spec import QuantSpec
from qig.runfiles import RUN_FILES, RUN_SUBDIR, SEARCH_TENSORS
from qig.runs import config_from_dict, read_search_config, run_file

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """Where the export went and what it holds (for the CLI's summary and the size benchmark)."""

    path: Path
    format: str
    linears: list[str]
    ignored: list[str]
    layout: str | None = None  # the format's storage layout, e.g. "pack-quantized"
    serving: str | None = None  # what can serve it


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
    return Run(path=path, config=saved, spec=config.spec, act_spec=config.act_spec, quantized=quantized)


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
        out[path] = from_params(
            mod.weight.data, params["scale"], params["zero"], run.spec, path, params.get("global_scale")
        )
    return out


def export(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    fmt: str = "compressed-tensors",
    overwrite: bool = False,
    dtype: str | None = None,
) -> ExportResult:
    """Export the ``qig quantize`` folder ``input_dir`` to ``output_dir`` in format ``fmt`` (see ``format_names()``).

    dtype: "float32", "float16" or "bfloat16" for the unquantized parts and the
    activations; None keeps the checkpoint's (qig quantize writes the source's dtype).
    Scales are stored in float32 so the dequantized weights are exact.
    """
    target = format_for(fmt)
    if dtype is not None and dtype not in DTYPES:
        raise QigError(f"dtype {dtype!r} is not supported; use one of: {', '.join(DTYPES)}")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    run = read_run(input_dir)
    target.check(run.spec, run.act_spec)
    model, processor = load_model_and_processor(run.path, dtype="auto", activation_quantizers=False)
    from qig.models import family_for

    family = family_for(model)
    quantized = codes(run, model)
    if dtype is not None:
        model.to(DTYPES[dtype])
    ignored = sorted(n for n in linears(model) if n not in quantized)

    with atomic_dir(output_dir, overwrite) as tmp:
        written = target.write(model, family=family, run=run, quantized=quantized, ignored=ignored, folder=tmp)
        _check_packed(model, quantized, target)
        processor.save_pretrained(tmp)  # tokenizer, processor config, chat template
        (tmp / RUN_SUBDIR).mkdir()
        for name in RUN_FILES:
            source = run_file(run.path, name)
            if source is not None:
                shutil.copyfile(source, tmp / RUN_SUBDIR / name)
    if written.serving is not None:
        log.info("%s: %s", written.layout, written.serving)
    return ExportResult(output_dir, fmt, sorted(quantized), ignored, written.layout, written.serving)


def check_format(fmt: str, spec: QuantSpec, act_spec: QuantSpec | None = None, act_order: bool = False) -> None:
    """Refuse, before any work, a format that cannot hold the setting (``qig quantize --format`` calls it).

    act_order: the run is GPTQ with act-order, whose permuted groups compressed-tensors cannot store.
    """
    format_for(fmt).check(spec, act_spec, act_order)


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


def _check_packed(model: torch.nn.Module, quantized: dict[str, QuantizedWeight], fmt: ExportFormat) -> None:
    """The integers the format stored must be qig's codes, exactly (formats that store none are skipped)."""
    for path, qw in quantized.items():
        pair = fmt.stored_codes(model.get_submodule(path), qw)
        if pair is None:
            continue
        held, q = pair
        if held.shape != q.shape or not torch.equal(held.to(q.dtype), q):
            raise QigError(f"{path}: {fmt.name} stored other integers than qig's codes; please report this")
