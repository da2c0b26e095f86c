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
from pathlib import Path

from qig.commands.quantize import parse_group_size
from qig.errors import QigError

log = logging.getLogger(__name__)


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "inspect", help="token-sensitivity maps (QIG vs MBQ vs AWQ token weights) as pictures + HTML, no quantization"
    )
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--calib", default=None, help="LLaVA-style JSON/JSONL (default: the embedded world's samples)")
    p.add_argument("--image-folder", default=None, help="images of --calib (default: the file's folder)")
    p.add_argument(
        "--embedded",
        choices=("qa", "captions"),
        default="qa",
        help="without --calib: embedded questions about the scene (default) or calibration captions",
    )
    p.add_argument("--samples", type=int, default=8, help="samples to inspect (default 8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the data (default 0)")
    p.add_argument(
        "--layers",
        default=None,
        help="layers to picture, e.g. 0,5,-1 or 'all' (default: first, middle, last; a list starting with a "
        "negative index is written --layers=-1,0); weights are computed for every layer up to the deepest",
    )
    p.add_argument("--wbits", type=int, default=3, help="weight bits of the quantizer QIG attributes (default 3)")
    p.add_argument("--abits", type=int, default=16, help="activation bits; only 16 (weight-only) for now")
    p.add_argument("--group-size", default="128", help="input channels per scale, or 'channel' (default 128)")
    p.add_argument("--baseline", choices=("quantized", "zero"), default="quantized", help="QIG reference x'")
    p.add_argument("--steps", type=int, default=None, help="QIG quadrature points (default 2)")
    p.add_argument("--max-length", type=int, default=1024, help="token cap per sample (default 1024)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward (default 16)")
    p.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--output", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from qig.api import check_device
    from qig.calib import calibration_for
    from qig.loading import load_model_and_processor
    from qig.tokenmaps import compute_token_maps, embedded_questions, write_report
    from qig.tokenmaps.render import require_matplotlib

    if Path(args.output).exists() and not args.overwrite:
        raise QigError(f"output folder {args.output} already exists; pass --overwrite to replace it")
    if args.abits != 16:
        raise QigError(f"--abits {args.abits}: only weight-only quantization (--abits 16) is inspected so far")
    if args.samples <= 0:
        raise QigError(f"--samples must be positive, got {args.samples}")
    if args.image_folder and not args.calib:
        raise QigError("--image-folder goes with --calib (the images of that file)")
    require_matplotlib()
    check_device(args.device)
    qig_options = {"baseline": args.baseline}
    if args.steps is not None:
        qig_options["steps"] = args.steps

    t0 = time.perf_counter()
    model, processor = load_model_and_processor(args.model)
    if args.calib:
        calib = calibration_for(
            model,
            processor,
            args.calib,
            image_folder=args.image_folder,
            n_samples=args.samples,
            seed=args.seed,
            max_length=args.max_length,
        )
        meta = None
    else:
        calib, meta = embedded_questions(
            model, processor, args.samples, args.seed, kind=args.embedded, max_length=args.max_length
        )
    t1 = time.perf_counter()
    maps = compute_token_maps(
        model,
        processor,
        calib,
        layers=args.layers,
        wbits=args.wbits,
        group_size=parse_group_size(args.group_size),
        device=args.device,
        batch_size=args.batch_size,
        meta=meta,
        qig_options=qig_options,
        progress=not args.no_progress,
    )
    t2 = time.perf_counter()
    maps.info.update(
        model=str(args.model or "embedded"),
        data=args.calib or f"embedded {args.embedded} (seed {args.seed})",
        seconds_load=t1 - t0,
        seconds_compute=t2 - t1,
    )
    out = write_report(maps, args.output, overwrite=args.overwrite, n_pictures=args.samples)
    log.info("load %.1fs, token weights %.1fs, pictures %.1fs", t1 - t0, t2 - t1, time.perf_counter() - t2)
    print(f"wrote token maps of {maps.n_samples} samples x layers {maps.shown} to {out / 'index.html'}")
    return 0
