"""A run folder: the files ``qig quantize`` writes next to the model, and reading them back.

    >>> from qig.runs import read_report, source_model
    >>> read_report("out/qig-w3")["config"]["method"]  # doctest: +SKIP
    'qig'
    >>> source_model("out/qig-w3")  # doctest: +SKIP
    '/models/llava-1.5-7b'

A run folder holds the fake-quantized model (``save_pretrained``: config.json
with its ``qig_quantization`` entry, weights, processor) and three run files:

- ``search.safetensors``: per searched group the scales and token weights,
  the calibration tokens' roles, the quantizer's parameters per linear;
- ``search.json``: the run's config (``"config"``), per-group losses, notes;
- ``report.json``: config, options, versions, timings, and the model the run
  quantized (``"source_model"``, its folder; ``"source_hub"``, the hub id and
  commit it was resolved from, or null; older reports: ``"options": {"model": ...}``).

An exported folder (``qig quantize --format``, ``qig export``) keeps the run
files in its ``qig/`` subfolder; the readers here look there too.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qig.errors import QigError
from qig.fileio import atomic_dir, atomic_write_text
from qig.methods import QuantConfig, config_class, config_from_options
from qig.models.layout import save_model
from qig.pipeline.finite import first_non_finite
from qig.quant.fold import check_scale
from qig.runfiles import REPORT_JSON, RUN_FILES, RUN_SUBDIR, SEARCH_JSON, SEARCH_TENSORS  # noqa: F401  (public here)

if TYPE_CHECKING:  # the annotation only
    from qig.pipeline.result import QuantizationResult

CONFIG_KEY = "qig_quantization"  # the quantized model's config.json entry (keys: qig.api's module docstring)


def run_file(folder: str | os.PathLike, name: str) -> Path | None:
    """``folder/name``, else ``folder/qig/name`` (an exported folder); None when neither exists.

    >>> run_file("out/qig-w3-ct", REPORT_JSON)  # doctest: +SKIP
    PosixPath('out/qig-w3-ct/qig/report.json')
    """
    folder = Path(folder)
    for path in (folder / name, folder / RUN_SUBDIR / name):
        if path.is_file():
            return path
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise QigError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise QigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise QigError(f"{path} holds a JSON {type(data).__name__}, not an object; it was not written by qig")
    return data


def read_report(folder: str | os.PathLike) -> dict | None:
    """The ``report.json`` of a run folder (or of its ``qig/`` subfolder); None when there is none.

    >>> read_report("out/qig-w3")["n_calibration_samples"]  # doctest: +SKIP
    128
    """
    path = run_file(folder, REPORT_JSON)
    return _read_json(path) if path is not None else None


def read_search_config(folder: str | os.PathLike) -> dict | None:
    """The run's config as saved in ``search.json`` (``QuantConfig.to_dict()``); None when the folder has none.

    Rebuild the config with ``config_from_dict``.

    >>> read_search_config("out/qig-w3")["method"]  # doctest: +SKIP
    'qig'
    """
    path = run_file(folder, SEARCH_JSON)
    if path is None:
        return None
    return _search_config(path)


def _search_config(path: Path) -> dict:
    saved = _read_json(path).get("config")
    if not isinstance(saved, dict) or "method" not in saved:
        raise QigError(f"{path} holds no run config with a 'method'; it was not written by 'qig quantize'")
    return saved


def source_model(folder: str | os.PathLike) -> str | None:
    """The model folder a run quantized, as its ``report.json`` records it; None when nothing records one.

    Read from ``"source_model"``, else (older reports) ``"options": {"model": ...}``;
    a run of the embedded model records null there and gets the embedded
    model's folder here. None: ``folder`` holds no report.json (it is not a qig
    run) or the report names no model. Whether the folder still exists is the
    caller's to check.

    >>> source_model("out/qig-w3")  # doctest: +SKIP
    '/models/llava-1.5-7b'
    """
    report = read_report(folder)
    if report is None:
        return None
    if "source_model" in report:
        source = report["source_model"]
    else:
        options = report.get("options")
        if not isinstance(options, dict) or "model" not in options:
            return None
        source = options["model"]
    if source is None:
        from qig.embedded import default_model_dir

        return str(default_model_dir())
    if not isinstance(source, str) or not source:
        where = run_file(folder, REPORT_JSON)
        raise QigError(f"{where}: the source model must be a folder path or null, got {source!r}")
    hub = report.get("source_hub")
    if not Path(source).is_dir() and isinstance(hub, dict) and isinstance(hub.get("repo_id"), str):
        from qig.hub import resolve_model  # a hub model's cache moved (another machine): the same id and commit

        return str(resolve_model(hub["repo_id"], hub.get("revision")).path)
    return source


SCALES_KEY = re.compile(r"scales\.([0-9]+)\.([A-Za-z_][A-Za-z0-9_]*)")  # scales.<layer>.<group name>, ASCII only


def load_scales(path: str | os.PathLike) -> tuple[dict[tuple[int, str], torch.Tensor], dict | None]:
    """Scales from a ``search.safetensors`` (or its folder), and the run's config from ``search.json`` if present.

    Refused, naming the key or the group: a ``scales.*`` key that is not
    ``scales.<layer>.<group>``, a tensor that is not 1-D, entries that are NaN,
    inf, zero or negative (see :func:`qig.quant.fold.check_scale`).

    >>> scales, config = load_scales("out/qig-w3/search.safetensors")  # doctest: +SKIP
    >>> scales[(0, "attn_in")].shape  # doctest: +SKIP
    torch.Size([4096])
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = run_file(path, SEARCH_TENSORS) or path / SEARCH_TENSORS
    if not path.is_file():
        raise QigError(f"scales file {path} does not exist; pass the search.safetensors of an earlier run")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise QigError(f"{path} is not a readable safetensors file: {exc}") from exc
    scales = {}
    for key, value in tensors.items():
        if not key.startswith("scales."):
            continue
        match = SCALES_KEY.fullmatch(key)
        if match is None:
            raise QigError(
                f"{path}: key {key!r} is not scales.<layer>.<group> (e.g. scales.0.attn_in); "
                "the file was not written by qig or was edited, pass the search.safetensors of an earlier run"
            )
        layer, group = int(match[1]), match[2]
        if (layer, group) in scales:
            raise QigError(f"{path}: two keys name layer {layer} {group} (one is {key!r}); keep one of them")
        check_scale(value, layer, group, f"{path}: ")
        scales[(layer, group)] = value
    if not scales:
        raise QigError(f"{path} holds no 'scales.<layer>.<group>' tensors; it is not a qig search result")
    config = None
    sidecar = path.with_name(SEARCH_JSON)
    if sidecar.is_file():
        config = _search_config(sidecar)
    return scales, config


CLIP_KEY = re.compile(r"clip\.([0-9]+)\.([A-Za-z_][A-Za-z0-9_.]*)")  # clip.<layer>.<linear path in the layer>


def load_clips(path: str | os.PathLike) -> dict[tuple[int, str], torch.Tensor]:
    """The clip ratios a run with ``weight_clip`` stored, ``{(layer, linear path): [out, n_groups]}``; {} if none.

    Read from the same ``search.safetensors`` (or its folder) as :func:`load_scales`;
    a ``--scales`` run applies them with the scales.

    >>> load_clips("out/awq-clip-w3")[(0, "self_attn.q_proj")].shape  # doctest: +SKIP
    torch.Size([256, 2])
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = run_file(path, SEARCH_TENSORS) or path / SEARCH_TENSORS
    clips = {}
    for key, value in load_file(path).items():  # load_scales has read (and checked) the file
        if not key.startswith("clip."):
            continue
        match = CLIP_KEY.fullmatch(key)
        if match is None or value.dim() != 2 or not bool(((value > 0) & (value <= 1)).all()):
            raise QigError(
                f"{path}: {key!r} is not clip.<layer>.<linear> holding ratios in (0, 1] per row and group; "
                "the file was not written by qig or was edited, pass the search.safetensors of an earlier run"
            )
        clips[(int(match[1]), match[2])] = value
    return clips


def config_from_dict(fields: dict) -> QuantConfig:
    """Rebuild a config from ``QuantConfig.to_dict()`` output (as saved in search.json).

    A saved config holds every field: those its method never reads (``unused``,
    at their defaults) are dropped, as is the ``seed`` of runs saved before it went.
    """
    fields = dict(fields)
    name = fields.get("method")
    if name is None:
        raise QigError("the saved config has no 'method'")
    fields.pop("seed", None)  # runs saved before the field went: it seeded nothing the run drew
    cls = config_class(name)
    defaults = {f.name: f.default for f in dataclass_fields(cls)}
    for key in cls.unused:
        if fields.get(key, defaults[key]) == defaults[key]:
            fields.pop(key, None)
    return config_from_options(name, fields)


def versions() -> dict[str, str]:
    import transformers

    from qig import __version__

    return {
        "qig": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


@dataclass
class Report:
    """A run's ``report.json``: what was quantized how, with what, by which versions, and how long each phase took.

    ``qig quantize`` fills every field; an API user gets one from
    :meth:`for_result` (``write_output`` makes it when given none), so every run
    folder has the same report. ``source_model`` is the folder the run quantized
    (what ``qig eval`` compares against), ``source_hub`` the hub id and commit it
    was resolved from (or None).

        >>> report = Report.for_result(result, source_model="/models/llava")  # doctest: +SKIP
    """

    config: dict
    options: dict = field(default_factory=dict)
    source_model: str | None = None
    source_hub: dict | None = None
    versions: dict = field(default_factory=versions)
    n_calibration_samples: int = 0
    processes: int = 1
    timings: dict = field(default_factory=dict)
    memory_plan: dict = field(default_factory=dict)
    dtypes: dict | None = None
    decoder: str = "memory"

    @classmethod
    def for_result(cls, result: QuantizationResult, **fields) -> Report:
        """The report of ``result``: its config, memory plan and timings (as ``quantize/<phase>``), and ``fields``."""
        timings = {**fields.pop("timings", {}), **{f"quantize/{k}": v for k, v in result.timings.items()}}
        fields.setdefault("config", result.config.to_dict())
        fields.setdefault("memory_plan", result.memory_plan)
        return cls(timings=timings, **fields)

    def to_dict(self) -> dict:
        return asdict(self)


def write_output(
    out: str | os.PathLike,
    model: torch.nn.Module,
    processor,
    result: QuantizationResult,
    report: Report | dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the fake-quantized model, the search result and the run report into ``out``, atomically.

    report: a :class:`Report`; None makes one from ``result`` (``Report.for_result``);
    a dict gives its fields (``{"source_model": ...}``).

    Everything goes to a temporary sibling folder first and is renamed into
    place; an existing ``out`` is refused unless ``overwrite``. A tensor of the
    model or of the search result, or a number of the run files, that is NaN or
    inf is refused before anything is written (see :func:`check_finite_output`).
    The model is saved in its family's serving key layout (``qig.models.layout``),
    so vLLM loads the folder as it is.
    """
    out = Path(out)
    if not isinstance(report, Report):
        report = Report.for_result(result, **(report or {}))
    report = report.to_dict()
    with atomic_dir(out, overwrite) as tmp:
        check_finite_output(model, result, report, out)
        t = time.perf_counter()
        _save_weights(model, tmp, out)
        if processor is not None:
            processor.save_pretrained(tmp)
        result.save(tmp)
        report["timings"]["save"] = time.perf_counter() - t
        atomic_write_text(tmp / REPORT_JSON, json.dumps(report, indent=1, default=str) + "\n")
    return out


def _save_weights(model: torch.nn.Module, tmp: Path, out: Path) -> None:
    """The model's weights into ``tmp``: ``save_model``, or layer by layer for a model streamed from disk."""
    from qig.models import family_for
    from qig.models.checkpoint import STREAMED
    from qig.models.layout import save_streamed

    source = getattr(model, STREAMED, None)
    if source is None:
        save_model(model, tmp)
        return
    if not source.quantized:
        raise QigError("the streamed model's layers were not quantized (run qig.quantize with work_dir first)")

    def read_layer(index: int) -> dict[str, torch.Tensor]:
        state = source.read_layer(index)
        _refuse_nonfinite(state.items(), f"quantized model's layer {index} tensor", out)
        return state

    save_streamed(model, tmp, family_for(model), read_layer)


def _refuse_nonfinite(items, what: str, out: Path) -> None:
    fix = (
        f"nothing was written to {out}; a folded scale or the quantizer overflowed the model's dtype, or the "
        "source is corrupt (check the source model and the scales, or load the model in float32)"
    )
    bad = first_non_finite(items)
    if bad is not None:
        raise QigError(f"the {what} {bad} holds NaN or inf values; {fix}")


def check_finite_output(model: torch.nn.Module, result: QuantizationResult, report: dict, out: Path) -> None:
    """Refuse NaN or inf in the model's state_dict, the search result's tensors, or search.json / report.json.

    Reads only: each floating tensor's minimum and maximum (``qig.pipeline.finite``). The source weights, the
    saved scales and the hidden states are checked where they enter the
    pipeline; this is the last guard before anything reaches ``out``.
    """
    fix = (
        f"nothing was written to {out}; a folded scale or the quantizer overflowed the model's dtype, or the "
        "source is corrupt (check the source model and the scales, or load the model in float32)"
    )
    for what, tensors in (("quantized model's tensor", model.state_dict()), ("search result's", result.tensors())):
        _refuse_nonfinite(tensors.items(), what, out)  # a streamed model's layers (meta) are checked as written
    for name, data in ((SEARCH_JSON, result.to_json()), (REPORT_JSON, report)):
        where = _nonfinite_number(data, "")
        if where is not None:
            raise QigError(f"{name}'s {where or 'value'} is NaN or inf; {fix}")


def _nonfinite_number(data, path: str) -> str | None:
    """The path of the first NaN or inf float in nested dicts and lists (``groups[3].loss_after``), else None."""
    if isinstance(data, float):
        return None if math.isfinite(data) else path
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list | tuple) else ()
    for key, value in items:
        found = _nonfinite_number(value, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip("."))
        if found is not None:
            return found
    return None
