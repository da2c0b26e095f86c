"""``qig eval``: exact-match visual-QA accuracy, per question type, and fidelity to a reference."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from qig.commands.flags import add_flags, from_args
from qig.embedded import world
from qig.errors import QigError
from qig.fileio import atomic_write_text
from qig.options import check_fields, option


@dataclass(frozen=True)
class EvalOptions:
    """``qig eval``'s options; each field is a flag."""

    model: str | None = option(None, "model folder (default: the embedded model)")
    seed: int = option(world.DEFAULT_EVAL_SEED, "eval split seed (other seeds: new sets)")
    n: int = option(1000, "questions generated for the eval split", min=1)
    limit: int | None = option(None, "evaluate only the first N questions", min=1)
    data: str | None = option(None, "a LLaVA-style QA JSON to evaluate instead of the embedded split")
    image_folder: str | None = option(None, "images of --data (default: the JSON's folder)")
    reference: str | None = option(
        None,
        "reference model folder for agreement and KL (default: the model a qig run in --model was quantized "
        "from, as its report.json records; none for other folders); 'none' to skip",
    )
    blank_images: bool = option(False, "replace every image by an empty background")
    device: str = option("cpu", "compute device: cpu, cuda, cuda:N")
    batch_size: int = option(64, "questions per forward", min=1)
    json: str | None = option(None, "write the report (with per-question predictions) here")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.image_folder is not None and self.data is None:
            raise QigError("--image-folder goes with --data (the images of that file)")


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate a model on the embedded visual-QA benchmark (or a LLaVA-style JSON)")
    add_flags(p, EvalOptions)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from qig.api import check_device
    from qig.evaluate import format_table, run_eval
    from qig.fileio import check_output_file

    opts = from_args(args, EvalOptions)
    check_device(opts.device)
    if opts.json:
        check_output_file(opts.json)
    reference, note = default_reference(opts.model, opts.reference)
    report = run_eval(
        model_dir=opts.model,
        seed=opts.seed,
        limit=opts.limit,
        n=opts.n,
        reference_dir=reference,
        data=opts.data,
        image_folder=opts.image_folder,
        device=opts.device,
        batch_size=opts.batch_size,
        blank_images=opts.blank_images,
    )
    print(format_table(report))
    if note:
        print(note)
    if opts.json:
        atomic_write_text(opts.json, json.dumps(report, indent=1) + "\n")
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
