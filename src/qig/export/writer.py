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
from qig.models.layout import save_model
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


def codes(run: Run, weights: dict[str, tuple[str, torch.Tensor]]) -> dict[str, QuantizedWeight]:
    """Per decoder linear (model path -> (stored key, saved weight)) its exact integer codes and parameters;
    refuses what cannot be exported."""
    if not run.quantized:
        log.info(
            "%s keeps no quantizer parameters (an older qig wrote it); reading the grid from the weights", run.path
        )
        return {path: recover(w, run.spec, path) for path, (_, w) in weights.items()}
    out = {}
    for path, (key, w) in weights.items():
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
        out[path] = from_params(w, params["scale"], params["zero"], run.spec, path, params.get("global_scale"))
    return out


def export(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    fmt: str = "compressed-tensors",
    overwrite: bool = False,
    dtype: str | None = None,
    model_offload: str = "none",
    max_shard_size: int | str = "50GB",
) -> ExportResult:
    """Export the ``qig quantize`` folder ``input_dir`` to ``output_dir`` in format ``fmt`` (see ``format_names()``).

    dtype: "float32", "float16" or "bfloat16" for the unquantized parts and the
    activations; None keeps the checkpoint's (qig quantize writes the source's dtype).
    Scales are stored in float32 so the dequantized weights are exact.
    model_offload: "none" loads the whole run; "disk" reads one decoder layer at a
    time from its shards and writes the output layer by layer (host memory: the
    rest of the model and a layer), byte for byte the same files; "auto": disk
    when the run passes a quarter of the available host memory (as ``qig
    quantize``). max_shard_size: as ``save_pretrained``'s (its default).
    """
    from qig.loading import load_plan
    from qig.models import family_for
    from qig.pipeline.layers import layers_for

    target = format_for(fmt)
    if dtype is not None and dtype not in DTYPES:
        raise QigError(f"dtype {dtype!r} is not supported; use one of: {', '.join(DTYPES)}")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    run = read_run(input_dir)
    target.check(run.spec, run.act_spec)
    decoder = load_plan("auto", run.path, "cpu", model_offload).decoder
    model, processor = load_model_and_processor(run.path, dtype="auto", activation_quantizers=False, decoder=decoder)
    family = family_for(model)
    paths = decoder_linears(model)
    if not paths:
        raise QigError("the model has no decoder linears to export")
    ignored = sorted(n for n in linears(model) if n not in paths)
    layers = layers_for(model, family)
    with atomic_dir(output_dir, overwrite) as tmp:
        if layers.streamed:
            _write_streamed(model, family, layers, paths, run, target, ignored, dtype, tmp, max_shard_size)
        else:
            _write_in_memory(model, family, paths, run, target, ignored, dtype, tmp, max_shard_size)
        written = target.end(tmp)
        processor.save_pretrained(tmp)  # tokenizer, processor config, chat template
        (tmp / RUN_SUBDIR).mkdir()
        for name in RUN_FILES:
            source = run_file(run.path, name)
            if source is not None:
                shutil.copyfile(source, tmp / RUN_SUBDIR / name)
    if written.serving is not None:
        log.info("%s: %s", written.layout, written.serving)
    return ExportResult(output_dir, fmt, sorted(paths), ignored, written.layout, written.serving)


def _by_layer(family, paths) -> list[list[str]]:
    """The decoder linears' paths grouped by layer, in layer order."""
    groups: dict[int, list[str]] = {}
    for path in paths:
        groups.setdefault(int(path.removeprefix(f"{family.layers}.").split(".")[0]), []).append(path)
    return [groups[i] for i in sorted(groups)]


def _write_in_memory(model, family, paths, run: Run, target: ExportFormat, ignored, dtype, tmp: Path, max_shard_size):
    """The whole model is in memory: every layer through the format, then ``save_model``.

    paths: the decoder linears (:func:`decoder_linears`)."""
    quantized = codes(run, {path: (key, mod.weight.data) for path, (key, mod) in paths.items()})
    if dtype is not None:
        model.to(DTYPES[dtype])
    target.begin(model, family=family, run=run, linears=sorted(paths), ignored=ignored)
    for group in _by_layer(family, paths):
        layer = {p: quantized[p] for p in group}
        target.write_layer(model, layer)
        _check_packed(model, layer, target, dtype)
    if target.saves_model:
        save_model(model, tmp, family, max_shard_size=max_shard_size)


@torch.no_grad()
def _write_streamed(
    model, family, layers, paths, run: Run, target: ExportFormat, ignored, dtype, tmp: Path, max_shard_size
):
    """The decoder layers are on disk: each is read, put through the format, and kept in a part file on its own;
    then the output shards are assembled from the parts (``qig.models.layout.save_in_parts``), the same bytes
    as :func:`_write_in_memory`. Host memory: the rest of the model and one layer."""
    from safetensors.torch import save_file

    from qig.hostmem import trim
    from qig.models.layout import layer_state, save_in_parts

    loaded = [{k: t.dtype for k, t in m.state_dict().items()} for m in layers.modules]  # the checkpoint's dtypes
    if dtype is not None:
        model.to(DTYPES[dtype])  # the meta layers too: each is read, then cast as the in-memory model is
    target.begin(model, family=family, run=run, linears=sorted(paths), ignored=ignored)
    parts_dir = tmp / ".parts"
    parts_dir.mkdir()
    parts = []
    for index, module in enumerate(layers.modules):
        prefix = f"{family.layers}.{index}."
        tensors = layers.index.read_prefix(prefix, torch.device("cpu"))
        if set(tensors) != set(loaded[index]):
            raise QigError(f"{run.path}: layer {index} holds other tensors than the model's; the run is corrupt")
        tensors = {k: t.to(loaded[index][k]) for k, t in tensors.items()}
        group = [p for p in paths if p.startswith(prefix)]
        layer = codes(run, {p: (paths[p][0], tensors[f"{p.removeprefix(prefix)}.weight"]) for p in group})
        module.to_empty(device="cpu")  # the format's own parameters too: write_layer sets every one it stores
        dtypes = {k: t.dtype for k, t in module.state_dict().items()}
        module.load_state_dict({k: t.to(dtypes[k]) for k, t in tensors.items()}, strict=False)
        del tensors
        target.write_layer(model, layer)
        _check_packed(model, layer, target, dtype)
        if target.saves_model:
            parts.append(parts_dir / f"layer-{index:05d}.safetensors")
            save_file(layer_state(model, family, index, module), parts[-1], metadata={"format": "pt"})
        module.to("meta")
        del layer
        trim()
    if target.saves_model:
        save_in_parts(model, tmp, family, parts, max_shard_size)
    shutil.rmtree(parts_dir)


def check_format(fmt: str, spec: QuantSpec, act_spec: QuantSpec | None = None, act_order: bool = False) -> None:
    """Refuse, before any work, a format that cannot hold the setting (``qig quantize --format`` calls it).

    act_order: the run is GPTQ with act-order, whose permuted groups compressed-tensors cannot store.
    """
    format_for(fmt).check(spec, act_spec, act_order)


def export_after(
    write_run, output_dir: str | os.PathLike, fmt: str, overwrite: bool = False, model_offload: str = "none"
) -> Path:
    """``write_run(folder)`` writes a quantize run into a temporary folder; export it to ``output_dir``, drop it.

    ``qig quantize --format`` uses this: the run's files end up in ``output_dir/qig/``. model_offload: as
    :func:`export`'s ("disk" for a run streamed from disk: the export is streamed too).
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    tmp = temp_dir_beside(output_dir)
    try:
        write_run(tmp / "run")
        return export(tmp / "run", output_dir, fmt, overwrite=overwrite, model_offload=model_offload).path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_packed(
    model: torch.nn.Module, quantized: dict[str, QuantizedWeight], fmt: ExportFormat, dtype: str | None = None
) -> None:
    """The integers the format stored must be qig's codes, exactly (formats that store none are skipped).

    dtype: the ``--dtype`` the weights were cast to before packing (None: the run's own).
    """
    for path, qw in quantized.items():
        pair = fmt.stored_codes(model.get_submodule(path), qw)
        if pair is None:
            continue
        held, q = pair
        if held.shape != q.shape or not torch.equal(held.to(q.dtype), q):
            if dtype is not None:
                raise QigError(
                    f"{path}: cast to {dtype}, the weights no longer hold qig's {qw.spec.bits}-bit codes exactly, so "
                    f"{fmt.name} would store others; export without --dtype, or quantize in {dtype} (--dtype)"
                )
            raise QigError(f"{path}: {fmt.name} stored other integers than qig's codes; please report this")
