"""``qig inspect``: token-sensitivity maps of AWQ, MBQ and QIG, without quantizing the model.

    qig inspect --output out/inspect                       # embedded model, 8 questions, layers 0, mid, last
    qig inspect --samples 8 --layers 0,3,-1 --wbits 3 --output out/inspect
    qig inspect --model my-llava --calib data.json --image-folder images --output out/maps

OUT holds ``index.html`` (open it in a browser, offline), ``overview.png``,
``shares.png``, ``variability.png``, ``samples/*.png``, ``maps.json`` (shares,
spreads, per-sample entropy vs uniform) and ``weights.safetensors``.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Literal

from qig.commands.flags import add_flags, from_args
from qig.commands.quantize import group_size_flag
from qig.errors import QigError
from qig.hub import calib_images_option, calib_split_option, model_option, revision_option
from qig.options import check_fields, option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InspectOptions:
    """``qig inspect``'s options; each field is a flag."""

    model: str | None = model_option()
    revision: str | None = revision_option()
    calib: str | None = option(
        None,
        "calibration records as qig quantize --calib takes them, or 'embedded' (the default for the embedded "
        "models only)",
        path=True,
    )
    calib_split: str | None = calib_split_option()
    image_folder: str | None = calib_images_option()
    embedded: Literal["qa", "captions"] = option(
        "qa", "without --calib: embedded questions about the scene, or calibration captions"
    )
    samples: int = option(8, "samples to inspect", min=1)
    seed: int = option(0, "sampling seed of the data", min=0)
    layers: str | None = option(
        None,
        "layers to picture, e.g. 0,5,-1 or 'all' (default: first, middle, last; a list starting with a "
        "negative index is written --layers=-1,0); weights are computed for every layer up to the deepest",
    )
    wbits: int = option(3, "weight bits of the quantizer QIG attributes")
    abits: int = option(
        16, "activation bits; only 16 (weight-only) is inspected so far", min=16, max=16, hint="weight-only so far"
    )
    group_size: int | None = option(128, "input channels per scale, or 'channel'", min=1)
    baseline: Literal["quantized", "zero"] = option("quantized", "QIG reference x'")
    steps: int | None = option(None, "QIG quadrature points (default: QIG's, 2)", min=1)
    max_length: int = option(1024, "token cap per sample", min=1)
    batch_size: int = option(16, "samples per forward", min=1)
    device: str = option("cpu", "compute device: cpu, cuda, cuda:N")
    output: str | None = option(
        None, "output folder (refused if it exists, unless --overwrite)", required=True, path=True
    )
    overwrite: bool = option(False, "replace an existing output folder")
    no_progress: bool = option(False, "no progress bars")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.image_folder and not self.calib:
            raise QigError("--image-folder goes with --calib (the images of that file)")
        if self.calib_split and not self.calib:
            raise QigError("--calib-split goes with --calib (a hub dataset id)")
        from qig.calib import check_calibration_source

        check_calibration_source(self.model, self.calib)


def register(p: argparse.ArgumentParser) -> None:
    """Flags of ``qig inspect`` on ``p`` (the subparser ``qig.cli`` made for it)."""
    add_flags(p, InspectOptions, types={"group_size": group_size_flag})
    p.set_defaults(func=run)


def run(args) -> int:
    from qig.api import check_device
    from qig.calib import EMBEDDED, calibration_for
    from qig.fileio import check_output_dir
    from qig.loading import load_model_and_processor
    from qig.tokenmaps import compute_token_maps, embedded_questions, write_report
    from qig.tokenmaps.render import require_matplotlib

    opts = from_args(args, InspectOptions)
    check_output_dir(opts.output, opts.overwrite)
    require_matplotlib()
    check_device(opts.device)
    qig_options = {"baseline": opts.baseline}
    if opts.steps is not None:
        qig_options["steps"] = opts.steps

    t0 = time.perf_counter()
    model, processor = load_model_and_processor(opts.model, revision=opts.revision)
    if opts.calib and opts.calib != EMBEDDED:
        calib = calibration_for(
            model,
            processor,
            opts.calib,
            image_folder=opts.image_folder,
            n_samples=opts.samples,
            seed=opts.seed,
            max_length=opts.max_length,
            split=opts.calib_split,
        )
        meta = None
    else:
        calib, meta = embedded_questions(
            model, processor, opts.samples, opts.seed, kind=opts.embedded, max_length=opts.max_length
        )
    t1 = time.perf_counter()
    maps = compute_token_maps(
        model,
        processor,
        calib,
        layers=opts.layers,
        wbits=opts.wbits,
        group_size=opts.group_size,
        device=opts.device,
        batch_size=opts.batch_size,
        meta=meta,
        qig_options=qig_options,
        progress=not opts.no_progress,
    )
    t2 = time.perf_counter()
    maps.info.update(
        model=str(opts.model or "embedded"),
        data=opts.calib or f"embedded {opts.embedded} (seed {opts.seed})",
        seconds_load=t1 - t0,
        seconds_compute=t2 - t1,
    )
    out = write_report(maps, opts.output, overwrite=opts.overwrite, n_pictures=opts.samples)
    log.info("load %.1fs, token weights %.1fs, pictures %.1fs", t1 - t0, t2 - t1, time.perf_counter() - t2)
    print(f"wrote token maps of {maps.n_samples} samples x layers {maps.shown} to {out / 'index.html'}")
    return 0
