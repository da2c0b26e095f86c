"""``qig eval``: exact-match visual-QA accuracy, per question type, and fidelity to a reference."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qig.commands.flags import add_flags, from_args
from qig.embedded import world
from qig.errors import QigError
from qig.fileio import atomic_write_text
from qig.hub import model_offload_option, model_option, revision_option
from qig.options import check_fields, option


@dataclass(frozen=True)
class EvalOptions:
    """``qig eval``'s options; each field is a flag."""

    model: str | None = model_option()
    revision: str | None = revision_option()
    seed: int = option(world.DEFAULT_EVAL_SEED, "eval split seed (other seeds: new sets)", min=0)
    n: int = option(1000, "questions generated for the eval split", min=1)
    limit: int | None = option(None, "evaluate only the first N questions", min=1)
    data: str | None = option(None, "a LLaVA-style QA JSON to evaluate instead of the embedded split", path=True)
    image_folder: str | None = option(None, "images of --data (default: the JSON's folder)", path=True)
    reference: str | None = option(
        None,
        "reference model folder for agreement and KL (default: the model a qig run in --model was quantized "
        "from, as its report.json records; none for other folders); 'none' to skip",
    )
    blank_images: bool = option(False, "replace every image by an empty background")
    device: str = option("cpu", "compute device: cpu, cuda, cuda:N")
    model_offload: Literal["auto", "disk", "none"] = model_offload_option("none")  # streaming costs reads per token
    batch_size: int = option(64, "questions per forward", min=1)
    json: str | None = option(None, "write the report (with per-question predictions) here", path=True)
    tasks: str | None = option(
        None,
        "run lmms-eval tasks instead, comma-separated, with the qig model: qig_world (the embedded split, no setup) "
        "or lmms-eval's own (e.g. vizwiz_vqa_val,mmmu_val); needs lmms-eval installed as docs/lmms-eval.md says",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.image_folder is not None and self.data is None:
            raise QigError("--image-folder goes with --data (the images of that file)")
        if self.tasks is not None:
            self._check_tasks()

    def task_names(self) -> list[str]:
        """The --tasks names, in order."""
        return [t.strip() for t in (self.tasks or "").split(",") if t.strip()]

    def _check_tasks(self) -> None:
        from qig.lmms import EMBEDDED_TASK

        names = self.task_names()
        if not names:
            raise QigError(f"--tasks {self.tasks!r} names no task; use e.g. --tasks {EMBEDDED_TASK}")
        if len(set(names)) < len(names):
            raise QigError(f"--tasks {self.tasks!r} names a task twice; name each once")
        # lmms-eval reads and scores each task itself: qig's own data, reference and image options have no place there
        refused = [flag for flag, given in TASKS_REFUSE.items() if given(self)]
        if EMBEDDED_TASK not in names:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            refused += [f"--{name}" for name in ("seed", "n") if getattr(self, name) != defaults[name]]
        if refused:
            raise QigError(
                f"{', '.join(refused)} not taken with --tasks (lmms-eval reads each task's own data and scores it); "
                "with --tasks use --model, --device, --model-offload, --batch-size, --limit, --json, and --seed/--n "
                f"for {EMBEDDED_TASK}"
            )


# What --tasks refuses, and how to tell that each was given.
TASKS_REFUSE = {
    "--data": lambda o: o.data is not None,
    "--image-folder": lambda o: o.image_folder is not None,
    "--reference": lambda o: o.reference is not None,
    "--blank-images": lambda o: o.blank_images,
}


def register(p: argparse.ArgumentParser) -> None:
    """Flags of ``qig eval`` on ``p`` (the subparser ``qig.cli`` made for it)."""
    add_flags(p, EvalOptions)
    p.set_defaults(func=run)


def run(args) -> int:
    from qig.api import check_device
    from qig.evaluate import format_table, run_eval
    from qig.fileio import check_output_file

    opts = from_args(args, EvalOptions)
    check_device(opts.device)
    if opts.json:
        check_output_file(opts.json)
    if opts.tasks is not None:
        return run_tasks(opts)
    reference, note = default_reference(opts.model, opts.reference)
    report = run_eval(
        model_dir=opts.model,
        revision=opts.revision,
        seed=opts.seed,
        limit=opts.limit,
        n=opts.n,
        reference_dir=reference,
        data=opts.data,
        image_folder=opts.image_folder,
        device=opts.device,
        batch_size=opts.batch_size,
        blank_images=opts.blank_images,
        model_offload=opts.model_offload,
    )
    print(format_table(report))
    if note:
        print(note)
    if opts.json:
        atomic_write_text(opts.json, json.dumps(report, indent=1) + "\n")
    return 0


def run_tasks(opts: EvalOptions) -> int:
    """``qig eval --tasks``: lmms-eval's ``simple_evaluate`` with the qig model; prints lmms-eval's table."""
    from qig.lmms.run import format_results, predictions, run_tasks

    names = opts.task_names()
    results = run_tasks(
        names,
        opts.model,
        device=opts.device,
        batch_size=opts.batch_size,
        limit=opts.limit,
        seed=opts.seed,
        n=opts.n,
        revision=opts.revision,
        model_offload=opts.model_offload,
    )
    print(format_results(results))
    if opts.json:
        report = {
            "model": opts.model or "embedded",
            "tasks": names,
            "results": results["results"],
            "predictions": {t: predictions(results, t) for t in results.get("samples", {})},  # per (sub)task
        }
        atomic_write_text(opts.json, json.dumps(report, indent=1, default=str) + "\n")
    return 0


def default_reference(model: str | None, reference: str | None) -> tuple[str | None, str | None]:
    """The reference folder to score ``model`` against, and a line saying why there is none (or None).

    ``--reference DIR`` / ``none`` decide; by default a qig run is compared with
    the model it was quantized from (``qig.runs.source_model``), the embedded
    model's folder for a run of it. The embedded model itself and folders that
    are not qig runs get no reference.
    """
    from qig.runs import source_model

    if reference is not None:
        return (None, None) if reference.lower() == "none" else (reference, None)
    if model is None or not Path(model).is_dir():
        return None, None  # the embedded model itself; a missing folder is reported by the loader
    source = source_model(model)
    if source is None:
        return None, (
            f"no reference: {model} is not a qig run (no report.json names its source model); "
            "pass --reference DIR for agreement and KL"
        )
    if not Path(source).is_dir():
        raise QigError(
            f"the source model of {model}, {source}, no longer exists; pass --reference none to score without "
            "a reference, or --reference DIR to compare with another folder"
        )
    return source, None
