"""``qig world SPLIT --output DIR``: write a split of the embedded visual-QA world."""

from __future__ import annotations

import argparse

from qig.embedded import world
from qig.errors import QigError


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("world", help="write a split of the embedded visual-QA world (PNG + LLaVA-style JSON)")
    p.add_argument("split", choices=sorted(world.SPLIT_IDS), help="train/eval: one question per image; calib: captions")
    p.add_argument("--output", required=True, help="output folder (images/ + data.json)")
    p.add_argument("--n", type=int, default=None, help="records (default: eval 1000, calib 128, train 1000)")
    p.add_argument("--seed", type=int, default=None, help="default: eval 1234, otherwise 0")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    n = args.n if args.n is not None else {"eval": 1000, "calib": 128, "train": 1000}[args.split]
    if n <= 0:
        raise QigError(f"--n must be positive, got {n}")
    seed = args.seed if args.seed is not None else (world.DEFAULT_EVAL_SEED if args.split == "eval" else 0)
    path = world.write_split(args.split, args.output, n=n, seed=seed, overwrite=args.overwrite)
    print(f"wrote {n} {args.split} records to {path}")
    return 0
