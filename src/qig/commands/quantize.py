"""``qig quantize``: PTQ of an LVLM with any registered method (RTN, SmoothQuant, AWQ, MBQ, QIG, GPTQ).

    qig quantize --method qig --wbits 3 --group-size 128 --output out/qig-w3
    qig quantize --method qig --wbits 4 --abits 8 --output out/qig-w4a8          # weight-activation W4A8
    qig quantize --method smoothquant --wbits 8 --abits 8 --alpha 0.5 --output out/sq-w8a8
    qig quantize --method gptq --wbits 3 --output out/gptq-w3                   # plain GPTQ
    qig quantize --method gptq --token-weights qig --wbits 3 --output out/g-q   # QIG-weighted Hessian
    qig quantize --method awq --quantizer gptq --wbits 3 --output out/awq-gptq  # AWQ's scales, then GPTQ
    qig quantize --method awq --calib coco/data.json --image-folder coco --output out/awq
    qig quantize --recipe recipe.yaml --output out/run      # flags override the recipe
    qig quantize --scales out/qig-w3/search.safetensors --output out/again

The method flags are derived from the config dataclasses (``qig.methods``):
one flag per field, with the field's help, type and range, and nothing filled
in that was not given, so a flag the chosen method does not take is refused
with the list of those it does. The run flags come from :class:`RunOptions`
the same way. A recipe's keys are the flags' names (``n_grid: 10``).

``--model`` is a folder or a hub id (``--revision``: its branch, tag or
commit), resolved through the Hugging Face cache (``qig.hub``). Without
``--calib`` the embedded world's calibration split is used for the embedded
models only; any other model needs ``--calib`` (a file, folder or hub dataset
id, or ``embedded`` to use the toy world on purpose). OUT holds
the fake-quantized model (``qig eval --model OUT``), ``search.safetensors`` +
``search.json`` and ``report.json``. ``--abits`` below 16 is a weight-activation
mode: weights per output channel (symmetric; no --group-size), activations per
token, quantized at run time (``qig eval`` re-installs their quantizers).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qig.calib import DEFAULT_MAX_LENGTH, DEFAULT_N_SAMPLES
from qig.commands.flags import Given, add_flag, add_flags, unwrap
from qig.errors import QigError
from qig.methods.config import (
    CONFIGS,
    all_options,
    config_from_options,
    default_group_size,
    make_config,
    methods_with,
    preset_names,
    token_weighting_names,
)
from qig.options import FlatOption, check_fields, check_path, flat_options, option

log = logging.getLogger(__name__)

SCALE_QUANTIZER_KEYS = ("wbits", "abits", "group_size")  # what --scales may change: the quantizer only
CALIBRATION_KEYS = ("calib", "calib_split", "image_folder", "n_samples", "calib_seed", "max_length")


@dataclass(frozen=True)
class RunOptions:
    """What a ``qig quantize`` run reads and writes, beside the method's config; each field is a flag."""

    model: str | None = option(
        None, "model folder or hub id such as Qwen/Qwen2-VL-2B-Instruct (default: the embedded model)", path=True
    )
    revision: str | None = option(None, "branch, tag or commit of a hub id in --model (default: main)")
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
    calib_split: str | None = option(None, "split of a hub dataset id in --calib (default: its only split)")
    image_folder: str | None = option(None, "images of --calib (default: the file's folder)", path=True)
    n_samples: int = option(DEFAULT_N_SAMPLES, "calibration samples", min=1)
    calib_seed: int | None = option(
        None, "seed that shuffles --calib (default 0) or draws the embedded split (default: the world's)", min=0
    )
    max_length: int = option(DEFAULT_MAX_LENGTH, "token cap per sample", min=1)
    device: str = option("cpu", "compute device: cpu, cuda, cuda:N")
    output: str | None = option(None, "output folder (required)", path=True)
    overwrite: bool = option(False, "replace an existing output folder")
    format: Literal["compressed-tensors", "fake-quant"] | None = option(
        None, "write OUTPUT as this export format (qig export; run files in OUTPUT/qig/)"
    )
    scales: str | None = option(None, "apply a saved search.safetensors instead of searching", path=True)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto",
        "dtype the model is loaded, quantized and saved in (auto: the checkpoint's; on a CPU device a float16 "
        "checkpoint is quantized in float32, which CPUs run ~10x faster, and saved in float16)",
    )
    model_offload: Literal["auto", "disk", "none"] = option(
        "auto",
        "disk: read each decoder layer from the checkpoint when it is quantized (host memory: the rest of the "
        "model and a layer); none: load the whole model; auto: disk when the decoder passes a quarter of the "
        "available host memory",
    )
    offload_streams: Literal["auto", "cpu", "none"] = option(
        "auto", "keep the calibration streams on the host (cpu) or the device (none); auto: the memory plan decides"
    )
    resume: bool = option(False, "continue the interrupted run of this --output from its last finished layer")
    report: bool = option(False, "also write token maps of the search's weights to OUT/report")
    no_progress: bool = option(False, "no progress bars")

    def __post_init__(self) -> None:
        check_fields(self)


RUN_OPTIONS = flat_options(RunOptions)


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "quantize",
        help=f"PTQ ({', '.join(CONFIGS)}; WxA16 or W-A); writes a loadable model folder",
        description="Flags default to nothing: what is not given is the config's default. "
        "A flag the chosen method does not take is refused.",
    )
    p.add_argument("--recipe", default=None, help="YAML file whose keys stand for the flags (e.g. wbits: 3)")
    add_flags(p, RunOptions)
    methods = p.add_argument_group("method options (in brackets: which methods take it, where not all)")
    for key, opt in all_options().items():
        _add_method_flag(methods, opt, methods_with(key))
    for preset in preset_names():
        holders = methods_with(preset)
        doc = getattr(CONFIGS[holders[0]], preset).__doc__.strip().splitlines()[0]
        methods.add_argument(f"--{preset}", action="store_true", default=None, help=f"{doc} [{', '.join(holders)}]")
    p.set_defaults(func=run)
    return p


def _add_method_flag(parser, opt: FlatOption, holders: list[str]) -> None:
    """A method option's flag; the methods that take it in brackets when not every method does."""
    suffix = f" [{', '.join(holders)}]" if len(holders) < len(CONFIGS) else ""
    overrides: dict[str, Any] = {}
    if opt.key == "group_size":
        overrides["type"] = group_size_flag
    elif opt.kind.base is not None and dataclasses.is_dataclass(opt.kind.base):  # a borrowed config: a name
        overrides["choices"] = ("uniform", *token_weighting_names())
    add_flag(parser, opt, suffix, **overrides)


def parse_group_size(value) -> int | None:
    """``--group-size``: an integer, or 'channel' (also per-channel/none/0) for one scale per output row."""
    if value is None or str(value).lower() in ("channel", "per-channel", "none", "0"):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise QigError(f"group_size {value!r} must be an integer such as 128, or 'channel'")


def group_size_flag(value: str) -> Given:
    """``--group-size`` as argparse reads it: 'channel' is None, which a flag's default would read as "not given"."""
    return Given(parse_group_size(value))


def given_options(args) -> dict[str, Any]:
    """The options the user gave: recipe keys, overridden by flags; nothing filled in from defaults.

    A recipe serves every method (docs/reproduce.md), so its calibration keys are
    dropped, with an info line, for a run that takes no data (RTN, ``--scales``);
    the same options given as flags are refused (``check_run``).
    """
    recipe = _read_recipe(args.recipe) if args.recipe else {}
    flags = {key: unwrap(getattr(args, key)) for key in _known_keys() if getattr(args, key, None) is not None}
    given = {**recipe, **flags}
    if given.get("method") == "rtn" or given.get("scales") is not None:
        unused = [k for k in CALIBRATION_KEYS if k in recipe and k not in flags]
        if unused:
            log.info("recipe %s: %s dropped (this run takes no calibration data)", args.recipe, ", ".join(unused))
        given = {k: v for k, v in given.items() if k not in unused}
    if "group_size" in given:
        given["group_size"] = parse_group_size(given["group_size"])
    return given


def _known_keys() -> list[str]:
    return [*RUN_OPTIONS, *all_options(), *preset_names()]


def _read_recipe(path: str) -> dict:
    import yaml

    check_path(path, "--recipe")
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError as exc:
        raise QigError(f"recipe {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise QigError(f"recipe {path} is a folder; pass a YAML file") from exc
    except UnicodeDecodeError as exc:
        raise QigError(f"recipe {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); pass a YAML file") from exc
    except OSError as exc:
        raise QigError(f"recipe {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise QigError(f"recipe {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    except RecursionError:
        raise QigError(f"recipe {path} nests too deeply to be a recipe (a mapping of option: value)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise QigError(f"recipe {path} must be a mapping of options (e.g. 'method: qig'), got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(_known_keys()))
    if unknown:
        raise QigError(
            f"recipe {path} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_known_keys()))}"
        )
    return data


def split_options(given: dict[str, Any]) -> tuple[RunOptions, dict[str, Any]]:
    """The run's own options (validated) and the method's (validated when its config is built)."""
    run_opts = RunOptions(**{k: v for k, v in given.items() if k in RUN_OPTIONS})
    return run_opts, {k: v for k, v in given.items() if k not in RUN_OPTIONS}


def build_config(run_opts: RunOptions, method_opts: dict[str, Any], saved: dict | None = None):
    """The run's config: from the method options given, or (``--scales``) the saved run's with a new quantizer."""
    if run_opts.scales is None:
        return config_from_options(run_opts.method, method_opts)
    extra = sorted(set(method_opts) - set(SCALE_QUANTIZER_KEYS))
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise QigError(
            f"{flags} do not apply with --scales: the saved scales are applied, not searched; "
            "only --wbits, --abits and --group-size choose the quantizer they are applied with"
        )
    if saved is None:
        return config_from_options(run_opts.method, method_opts)
    fields = dict(saved)
    name = fields.pop("method", None)
    if name is None:
        raise QigError("the saved config has no 'method'")
    if "abits" in method_opts and "group_size" not in method_opts:
        method_opts = {**method_opts, "group_size": default_group_size(method_opts["abits"])}
    return make_config(name, **{**fields, **method_opts})


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
    without_data = run_opts.scales is not None or config.name == "rtn"
    unused = [k for k in CALIBRATION_KEYS if k in given]
    if without_data and unused:
        why = "--scales runs use" if run_opts.scales is not None else f"{config.name} uses"
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise QigError(f"{flags}: {why} no calibration data; drop them")
    if not without_data:
        from qig.calib import check_calibration_file, check_calibration_source

        check_calibration_source(run_opts.model, run_opts.calib)
    if not without_data and run_opts.calib is not None:
        seed = 0 if run_opts.calib_seed is None else run_opts.calib_seed
        check_calibration_file(run_opts.calib, run_opts.image_folder, run_opts.n_samples, seed, run_opts.calib_split)
    if run_opts.report:
        from qig.tokenmaps.render import require_matplotlib

        require_matplotlib()
        if without_data:
            raise QigError("--report shows the token weights of a search; rtn and --scales runs have none")
    if run_opts.format:
        from qig.export import check_format

        gptq = config.gptq_settings
        check_format(run_opts.format, config.spec, config.abits, act_order=gptq is not None and gptq.act_order)


def run(args) -> int:
    """The command; under torchrun every rank runs it, rank 0 writes (``qig.dist``)."""
    from qig import dist

    run_opts, _ = split_options(given_options(args))  # the device (every rank refuses bad options alike)
    ranks, device = dist.init_from_env(run_opts.device)
    if ranks.size > 1 and not ranks.main:
        logging.getLogger("qig").setLevel(logging.WARNING)  # one rank speaks
    try:
        with dist.use(ranks):
            try:
                return _run(args, ranks, device)
            except (dist.RankFailed, KeyboardInterrupt):
                raise
            except BaseException as exc:
                if ranks.size > 1:  # the other ranks wait in an exchange: they stop with this message
                    message = str(exc) if isinstance(exc, QigError) else f"{type(exc).__name__}: {exc}"
                    with contextlib.suppress(dist.RankFailed):
                        dist.fail(message)
                raise
    finally:
        if ranks.size > 1:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _run(args, ranks, device: str) -> int:
    import qig
    from qig import dist
    from qig.api import summary_table
    from qig.calib import calibration_for
    from qig.hub import resolve_model
    from qig.loading import load_model_and_processor
    from qig.pipeline.timing import Timer
    from qig.runs import load_scales, versions

    given = given_options(args)
    run_opts, method_opts = split_options(given)
    scales = saved = None
    if run_opts.scales:
        scales, saved = load_scales(run_opts.scales)
    config = build_config(run_opts, method_opts, saved)
    if saved is not None and not method_opts:
        log.info("applying %s with the saved run's quantizer %s", run_opts.scales, config.spec.label())
    check_run(run_opts, config, given)

    timer = Timer()
    source = resolve_model(run_opts.model, run_opts.revision, run_opts.trust_remote_code)
    compute, save = run_dtypes(run_opts.dtype, source.path, run_opts.device)
    decoder = decoder_place(run_opts.model_offload, source.path)
    with timer("load"):
        model, processor = load_model_and_processor(
            source.path, dtype=compute, trust_remote_code=run_opts.trust_remote_code, decoder=decoder
        )
    log.info(
        "model in %s (saved in %s), decoder layers %s",
        compute,
        save,
        "read from disk" if decoder == "disk" else "in memory",
    )
    calib = None
    if scales is None and config.name != "rtn":
        with timer("calibration_data"):
            calib = calibration_for(
                model,
                processor,
                run_opts.calib,
                image_folder=run_opts.image_folder,
                n_samples=run_opts.n_samples,
                seed=run_opts.calib_seed,
                max_length=run_opts.max_length,
                split=run_opts.calib_split,
            )
    work = partial_dir(run_opts.output)
    with timer("quantize"), keeping_partial(work):
        result = qig.quantize(
            model,
            config,
            calib,
            device=device,
            scales=scales,
            progress=not run_opts.no_progress and ranks.main,
            work_dir=work,
            resume=run_opts.resume,
            offload_streams=run_opts.offload_streams,
            fingerprint_extra={"dtype": str(compute).removeprefix("torch."), "scales_file": run_opts.scales},
        )
    result.applied_from = run_opts.scales
    model.to(save)  # saved in the source's dtype unless asked otherwise
    timings = {**timer.totals, **{f"quantize/{k}": v for k, v in result.timings.items()}}
    report = {
        "config": config.to_dict(),
        "options": {**dataclasses.asdict(run_opts), **method_opts},
        "source_model": str(source.path.resolve()) if run_opts.model else None,
        "source_hub": {"repo_id": source.repo_id, "revision": source.revision} if source.repo_id else None,
        "versions": versions(),
        "n_calibration_samples": len(calib) if calib is not None else 0,
        "processes": ranks.size,
        "timings": timings,
        "memory_plan": result.memory_plan,
        "dtypes": {"compute": str(compute).removeprefix("torch."), "saved": str(save).removeprefix("torch.")},
        "decoder": decoder,
    }
    if not ranks.main:
        dist.barrier()  # rank 0 writes; its failure, if any, is raised here too
        return 0
    with keeping_partial(work):
        out = _write(run_opts, model, processor, result, report)
    _remove_partial(work)
    dist.barrier()
    if run_opts.report:
        from qig.tokenmaps import write_run_report

        write_run_report(result, calib, processor, model.config, out / "report")
    print(summary_table(result))
    print(f"wrote {config.name} {config.label()} model to {out}")
    return 0


def run_dtypes(name: str, model_dir: str | Path | None, device: str):
    """(the dtype the run computes in, the dtype it saves in) for ``--dtype`` on ``device``.

    auto: the checkpoint's, except float16 on a CPU device, which is computed in
    float32 (CPUs have no fast float16 kernels: ~10x slower, measured on the
    embedded model) and saved in float16. bfloat16 runs fast on CPUs as it is.
    """
    import torch

    from qig.loading import checkpoint_dtype, resolve_dtype

    if name != "auto":
        dtype = resolve_dtype(name, model_dir)
        return dtype, dtype
    source = checkpoint_dtype(model_dir)
    if source == torch.float16 and torch.device(device).type == "cpu":
        return torch.float32, source
    return source, source


def decoder_place(choice: str, model_dir: str | Path | None) -> str:
    """``--model-offload``: "disk" or "memory" for the loader (auto: disk past a quarter of the free host memory)."""
    if choice == "disk":
        return "disk"
    if choice == "none":
        return "memory"
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


def partial_dir(output: str) -> Path:
    """Where a run keeps its finished layers until its output is written: OUTPUT.partial beside it."""
    out = Path(output)
    return out.with_name(out.name + ".partial")


@contextlib.contextmanager
def keeping_partial(work: Path):
    """If the run stops here, the CLI says where its finished layers are and how to go on (none: nothing is kept)."""
    from qig import fileio

    try:
        yield
    except BaseException:
        done = sorted(work.glob("layer-*.json")) if work.is_dir() else []
        if done:
            fileio.note_resumable(
                work,
                f"the {len(done)} finished layers are kept in {work}; run the same command with --resume to "
                f"continue from there (or remove {work} to start over)",
            )
        else:
            _remove_partial(work)  # only a fingerprint: nothing to resume from
        raise


def _remove_partial(work: Path) -> None:
    import shutil

    from qig import fileio

    if work.is_dir():
        shutil.rmtree(work)
    fileio.forget_resumable(work)


def _write(run_opts: RunOptions, model, processor, result, report) -> Path:
    from qig.runs import write_output

    if not run_opts.format:
        return write_output(run_opts.output, model, processor, result, report, overwrite=run_opts.overwrite)
    from qig.export import export_after

    def write(tmp):
        return write_output(tmp, model, processor, result, report)

    return export_after(write, run_opts.output, run_opts.format, overwrite=run_opts.overwrite)
