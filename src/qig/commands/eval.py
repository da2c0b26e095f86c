"""``qig eval``: exact-match visual-QA accuracy, per question type, and fidelity to a reference."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qig.embedded import world
from qig.errors import QigError
from qig.fileio import atomic_write_text


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate a model on the embedded visual-QA benchmark (or a LLaVA-style JSON)")
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--seed", type=int, default=world.DEFAULT_EVAL_SEED, help="eval split seed (other seeds: new sets)")
    p.add_argument("--n", type=int, default=1000, help="questions generated for the eval split")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    p.add_argument("--data", default=None, help="a LLaVA-style QA JSON to evaluate instead of the embedded split")
    p.add_argument("--image-folder", default=None, help="images of --data (default: the JSON's folder)")
    p.add_argument(
        "--reference",
        default=None,
        help="reference model folder for agreement and KL (default: the model a qig run in --model was quantized "
        "from, as its report.json records; none for other folders); 'none' to skip",
    )
    p.add_argument("--blank-images", action="store_true", help="replace every image by an empty background")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="write the report (with per-question predictions) here")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from qig.evaluate import format_table, run_eval

    if args.limit is not None and args.limit <= 0:
        raise QigError(f"--limit must be positive, got {args.limit}")
    reference, note = default_reference(args.model, args.reference)
    report = run_eval(
        model_dir=args.model,
        seed=args.seed,
        limit=args.limit,
        n=args.n,
        reference_dir=reference,
        data=args.data,
        image_folder=args.image_folder,
        device=args.device,
        batch_size=args.batch_size,
        blank_images=args.blank_images,
    )
    print(format_table(report))
    if note:
        print(note)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
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
