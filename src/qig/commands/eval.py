"""``qig eval``: exact-match visual-QA accuracy, per question type, and fidelity to a reference."""

from __future__ import annotations

import argparse
import json

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
        help="reference model for agreement and KL (default: the embedded FP model when --model is given; "
        "'none' to skip)",
    )
    p.add_argument("--blank-images", action="store_true", help="replace every image by an empty background")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="write the report (with per-question predictions) here")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from qig.embedded import default_model_dir
    from qig.evaluate import format_table, run_eval

    if args.limit is not None and args.limit <= 0:
        raise QigError(f"--limit must be positive, got {args.limit}")
    reference = args.reference
    if reference is None and args.model is not None:
        reference = str(default_model_dir())
    if reference is not None and reference.lower() == "none":
        reference = None
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
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    return 0
