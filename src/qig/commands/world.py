"""``qig world SPLIT --output DIR``: write a split of the embedded visual-QA world."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from qig.commands.flags import add_flags, from_args
from qig.embedded import world
from qig.options import check_fields, option

DEFAULT_N = {"eval": 1000, "calib": 128, "train": 1000}


@dataclass(frozen=True)
class WorldOptions:
    """``qig world``'s options; each field is a flag (``split`` is positional)."""

    split: str | None = option(
        None,
        "train/eval: one question per image; calib: captions",
        choices=lambda: tuple(sorted(world.SPLIT_IDS)),
        positional=True,
    )
    output: str | None = option(None, "output folder (images/ + data.json)", required=True, path=True)
    n: int | None = option(None, "records (default: eval 1000, calib 128, train 1000)", min=1)
    seed: int | None = option(None, "default: eval 1234, otherwise 0", min=0)
    overwrite: bool = option(False, "replace an existing output folder")

    def __post_init__(self) -> None:
        check_fields(self)


def register(p: argparse.ArgumentParser) -> None:
    """Flags of ``qig world`` on ``p`` (the subparser ``qig.cli`` made for it)."""
    add_flags(p, WorldOptions)
    p.set_defaults(func=run)


def run(args) -> int:
    from qig.fileio import check_output_dir

    opts = from_args(args, WorldOptions)
    check_output_dir(opts.output, opts.overwrite)
    n = opts.n if opts.n is not None else DEFAULT_N[opts.split]
    seed = opts.seed if opts.seed is not None else (world.DEFAULT_EVAL_SEED if opts.split == "eval" else 0)
    path = world.write_split(opts.split, opts.output, n=n, seed=seed, overwrite=opts.overwrite)
    print(f"wrote {n} {opts.split} records to {path}")
    return 0
