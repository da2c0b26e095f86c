"""A ``qig quantize`` job: its options, what is refused before any work, and the run from a model to a folder.

    >>> from qig.job import RunOptions, run_job
    >>> from qig.methods import AWQConfig
    >>> opts = RunOptions(model="Qwen/Qwen2-VL-2B-Instruct", calib="captions.json", output="out/awq")  # doctest: +SKIP
    >>> run_job(opts, AWQConfig(wbits=4))  # doctest: +SKIP
    PosixPath('out/awq')

``qig quantize`` is an adapter over this module: it parses flags and the
recipe into :class:`RunOptions` and a method config, calls :func:`check_run`,
then :func:`run_job`, and prints. The job resolves the model (a folder or a
hub id, ``qig.hub``), loads it as the load plan says (``qig.loading.load_plan``),
builds the calibration set when the method needs one, quantizes with
``qig.quantize`` keeping finished layers in ``OUTPUT.partial``
(``qig.pipeline.journal``), and writes the folder with its
:class:`qig.runs.Report` (``qig.runs.write_output``, or an export format).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qig.calib import DEFAULT_MAX_LENGTH, DEFAULT_N_SAMPLES, check_calibration_file, check_calibration_source
from qig.errors import QigError
from qig.hub import calib_images_option, calib_split_option, model_offload_option, model_option, revision_option
from qig.methods import needs_calibration
from qig.methods.config import CONFIGS
from qig.options import check_fields, flat_options, option

log = logging.getLogger(__name__)


def _format_names() -> tuple[str, ...]:
    from qig.export import format_names  # the export-format registry: what `--format` may name

    return tuple(format_names())


SCALE_QUANTIZER_KEYS = ("wbits", "abits", "group_size")  # what --scales may change: the quantizer only
CALIBRATION_KEYS = ("calib", "calib_split", "image_folder", "n_samples", "calib_seed", "max_length")


@dataclass(frozen=True)
class RunOptions:
    """What a ``qig quantize`` run reads and writes, beside the method's config; each field is a flag."""

    model: str | None = model_option()
    revision: str | None = revision_option()
    trust_remote_code: bool = option(
        False, "allow a model folder's own Python code to run (e.g. InternVL2); read it first"
    )
    method: str = option("qig", "the method", choices=lambda: tuple(CONFIGS))
    calib: str | None = option(
        None,
        "JSON/JSONL (LLaVA or messages records, or text), a datasets folder, parquet, a hub dataset id, or "
        "'embedded' (the toy world's split; the default for the embedded models only)",
        path=True,
    )
    calib_split: str | None = calib_split_option()
    image_folder: str | None = calib_images_option()
    n_samples: int = option(DEFAULT_N_SAMPLES, "calibration samples", min=1)
    calib_seed: int | None = option(
        None, "seed that shuffles --calib (default 0) or draws the embedded split (default: the world's)", min=0
    )
    max_length: int = option(DEFAULT_MAX_LENGTH, "token cap per sample", min=1)
    device: str = option("cpu", "compute device: cpu, cuda, cuda:N")
    output: str | None = option(None, "output folder (required)", path=True)
    overwrite: bool = option(False, "replace an existing output folder")
    format: str | None = option(
        None, "write OUTPUT as this export format (qig export; run files in OUTPUT/qig/)", choices=_format_names
    )
    scales: str | None = option(None, "apply a saved search.safetensors instead of searching", path=True)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto",
        "dtype the model is loaded, quantized and saved in (auto: the checkpoint's; on a CPU device a float16 "
        "checkpoint is quantized in float32, which CPUs run ~10x faster, and saved in float16)",
    )
    model_offload: Literal["auto", "disk", "none"] = model_offload_option()
    offload_streams: Literal["auto", "cpu", "none"] = option(
        "auto",
        "keep the calibration streams and the search's group inputs on the host (cpu) or the device (none); "
        "auto: the memory plan decides (the streams first)",
    )
    resume: bool = option(False, "continue the interrupted run of this --output from its last finished layer")
    report: bool = option(False, "also write token maps of the search's weights to OUT/report")
    no_progress: bool = option(False, "no progress bars")

    def __post_init__(self) -> None:
        check_fields(self)


RUN_OPTIONS = flat_options(RunOptions)


def check_run(run_opts: RunOptions, config, given: dict[str, Any]) -> None:
    """Refuse, before any work, what the run cannot do or would ignore."""
    from qig.api import check_device
    from qig.fileio import check_output_dir
    from qig.hub import is_repo_id

    if not run_opts.output:
        raise QigError("--output is required (the folder to write the quantized model into)")
    check_output_dir(run_opts.output, run_opts.overwrite)
    check_device(run_opts.device)
    is_repo_id(run_opts.model, run_opts.revision)  # refuses --revision with a folder
    without_data = run_opts.scales is not None or not needs_calibration(config)
    unused = [k for k in CALIBRATION_KEYS if k in given]
    if without_data and unused:
        why = "--scales runs use" if run_opts.scales is not None else f"{config.name} uses"
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise QigError(f"{flags}: {why} no calibration data; drop them")
    if not without_data:
        check_calibration_source(run_opts.model, run_opts.calib)
        if run_opts.calib is not None:
            seed = 0 if run_opts.calib_seed is None else run_opts.calib_seed
            check_calibration_file(
                run_opts.calib, run_opts.image_folder, run_opts.n_samples, seed, run_opts.calib_split
            )
    if run_opts.report:
        from qig.tokenmaps.render import require_matplotlib

        require_matplotlib()
        if without_data:
            raise QigError("--report shows the token weights of a search; rtn and --scales runs have none")
    if run_opts.format:
        from qig.export import check_format

        gptq = config.gptq_settings
        check_format(run_opts.format, config.spec, config.act_spec, act_order=gptq is not None and gptq.act_order)


def run_job(
    run_opts: RunOptions,
    config,
    scales: dict | None = None,
    options: dict[str, Any] | None = None,
    ranks=None,
    device: str | None = None,
    clips: dict | None = None,
):
    """Load, calibrate, quantize and write ``run_opts.output``; returns (the folder, the result, the calibration set).

    scales: saved scales to apply instead of searching (``qig.runs.load_scales``), with
    the saved run's clip ratios ``clips`` (``qig.runs.load_clips``), if it searched any;
    options: what the report records as given beside ``run_opts`` (the method's
    options); ranks/device: a distributed run's (``qig.dist``; default one process
    on ``run_opts.device``). On a rank that does not write, the folder is None.
    """
    import qig
    from qig import dist
    from qig.pipeline.journal import keeping_partial, partial_dir, remove_partial
    from qig.pipeline.timing import Timer

    ranks = ranks if ranks is not None else dist.Ranks()
    timer = Timer()
    source, plan, model, processor = _load(run_opts, config, timer)
    calib = _calibration(run_opts, config, model, processor, timer) if scales is None else None
    work = partial_dir(run_opts.output)
    with timer("quantize"), keeping_partial(work):
        result = qig.quantize(
            model,
            config,
            calib,
            device=device or run_opts.device,
            scales=scales,
            clips=clips,
            progress=not run_opts.no_progress and ranks.main,
            work_dir=work,
            resume=run_opts.resume,
            offload_streams=run_opts.offload_streams,
            fingerprint_extra={"dtype": _name(plan.compute), "scales_file": run_opts.scales},
        )
    result.applied_from = run_opts.scales
    model.to(plan.save)  # saved in the source's dtype unless asked otherwise
    report = _report(run_opts, options, source, plan, result, calib, ranks, timer)
    if not ranks.main:
        dist.barrier()  # rank 0 writes; its failure, if any, is raised here too
        return None, result, calib
    with keeping_partial(work):
        out = _write(run_opts, model, processor, result, report, plan.decoder == "disk")
    remove_partial(work)
    dist.barrier()
    if run_opts.report:
        from qig.tokenmaps import write_run_report

        write_run_report(result, calib, processor, model.config, out / "report")
    return out, result, calib


def _load(run_opts: RunOptions, config, timer):
    """The model resolved (a folder or a hub id), its group size checked from its config, loaded as planned."""
    from qig.hub import resolve_model
    from qig.loading import load_model_and_processor, load_plan
    from qig.preflight import check_checkpoint_group_size

    source = resolve_model(run_opts.model, run_opts.revision, run_opts.trust_remote_code)
    if config.group_size is not None and not run_opts.trust_remote_code:  # remote code: checked once loaded
        check_checkpoint_group_size(source.path, config.group_size)  # from the config alone, before any weight
    plan = load_plan(run_opts.dtype, source.path, run_opts.device, run_opts.model_offload)
    with timer("load"):
        model, processor = load_model_and_processor(
            source.path, dtype=plan.compute, trust_remote_code=run_opts.trust_remote_code, decoder=plan.decoder
        )
    log.info("%s", plan.describe())
    return source, plan, model, processor


def _calibration(run_opts: RunOptions, config, model, processor, timer):
    """The calibration set the method needs (None for a method that reads no data)."""
    from qig.calib import calibration_for

    if not needs_calibration(config):
        return None
    with timer("calibration_data"):
        return calibration_for(
            model,
            processor,
            run_opts.calib,
            image_folder=run_opts.image_folder,
            n_samples=run_opts.n_samples,
            seed=run_opts.calib_seed,
            max_length=run_opts.max_length,
            split=run_opts.calib_split,
        )


def _report(run_opts: RunOptions, options, source, plan, result, calib, ranks, timer):
    from qig.runs import Report

    return Report.for_result(
        result,
        options={**dataclasses.asdict(run_opts), **(options or {})},
        source_model=str(source.path.resolve()) if run_opts.model else None,
        source_hub={"repo_id": source.repo_id, "revision": source.revision} if source.repo_id else None,
        n_calibration_samples=len(calib) if calib is not None else 0,
        processes=ranks.size,
        timings=timer.totals,
        dtypes={"compute": _name(plan.compute), "saved": _name(plan.save)},
        decoder=plan.decoder,
    )


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write(run_opts: RunOptions, model, processor, result, report, streamed: bool) -> Path:
    from qig.runs import write_output

    if not run_opts.format:
        return write_output(run_opts.output, model, processor, result, report, overwrite=run_opts.overwrite)
    from qig.export import export_after

    def write(tmp):
        return write_output(tmp, model, processor, result, report)

    # A run streamed from disk is exported the same way: one layer at a time, the same bytes.
    offload = "disk" if streamed else "none"
    return export_after(write, run_opts.output, run_opts.format, overwrite=run_opts.overwrite, model_offload=offload)
