"""``qig quantize``: PTQ of an LVLM with RTN, SmoothQuant, AWQ, MBQ, QIG or GPTQ.

    qig quantize --method qig --wbits 3 --group-size 128 --output out/qig-w3
    qig quantize --method qig --wbits 4 --abits 8 --output out/qig-w4a8          # weight-activation W4A8
    qig quantize --method smoothquant --wbits 8 --abits 8 --alpha 0.5 --output out/sq-w8a8
    qig quantize --method gptq --wbits 3 --output out/gptq-w3                   # plain GPTQ
    qig quantize --method gptq --token-weights qig --wbits 3 --output out/g-q   # QIG-weighted Hessian
    qig quantize --method awq --quantizer gptq --wbits 3 --output out/awq-gptq  # AWQ's scales, then GPTQ
    qig quantize --method awq --calib coco/data.json --image-folder coco --output out/awq
    qig quantize --recipe recipe.yaml --output out/run      # flags override the recipe
    qig quantize --scales out/qig-w3/search.safetensors --output out/again

Without ``--calib`` the embedded world's calibration split is used. OUT holds
the fake-quantized model (``qig eval --model OUT``), ``search.safetensors`` +
``search.json`` and ``report.json``. ``--abits`` below 16 is a weight-activation
mode: weights per output channel (symmetric; no --group-size), activations per
token, quantized at run time (``qig eval`` re-installs their quantizers).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from qig.errors import QigError

log = logging.getLogger(__name__)

METHODS = ("rtn", "smoothquant", "awq", "mbq", "qig", "gptq")
TOKEN_WEIGHTS = ("uniform", "awq", "mbq", "qig")  # --token-weights of --method gptq

# Recipe keys (YAML) and their flags; the recipe uses the flag names with '_' for '-'.
_OPTIONS = {
    "model": None,
    "method": "qig",
    "wbits": 4,
    "abits": 16,
    "group_size": None,  # 128 in weight-only modes, per-channel in W-A modes
    "calib": None,
    "image_folder": None,
    "n_samples": 128,
    "calib_seed": 0,
    "max_length": 1024,
    "device": "cpu",
    "output": None,
    "scales": None,
    "seed": 0,
    "batch_size": 16,
    "n_grid": 20,
    "loss": "mae",
    "grad_batch_size": 4,
    "alpha": None,
    "baseline": "quantized",
    "clip": "iqr",
    "tokens": None,  # QIG default: all
    "steps": None,
    "quadrature": None,
    "compat": False,
    "quantizer": None,
    "token_weights": None,
    "block_size": None,
    "damp": None,
    "act_order": False,
    "overwrite": False,
    "format": None,
    "trust_remote_code": False,
}


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "quantize", help="PTQ (RTN, SmoothQuant, AWQ, MBQ, QIG, GPTQ; WxA16 or W-A); writes a loadable model folder"
    )
    p.add_argument("--recipe", default=None, help="YAML file whose keys stand for the flags (e.g. wbits: 3)")
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="allow a model folder's own Python code to run (e.g. InternVL2); read it first",
    )
    p.add_argument("--method", choices=METHODS, default=None, help="default qig")
    p.add_argument("--wbits", type=int, default=None, help="weight bits, 2-8 (default 4)")
    p.add_argument(
        "--abits",
        type=int,
        default=None,
        help="activation bits, 4-16 (default 16: weight-only); e.g. 8 for W4A8/W8A8: per-token, dynamic",
    )
    p.add_argument(
        "--group-size", default=None, help="input channels per scale, or 'channel' (default 128; W-A: channel)"
    )
    p.add_argument("--calib", default=None, help="LLaVA-style JSON/JSONL or text JSONL (default: embedded split)")
    p.add_argument("--image-folder", default=None, help="images of --calib (default: the file's folder)")
    p.add_argument("--n-samples", type=int, default=None, help="calibration samples (default 128)")
    p.add_argument("--calib-seed", type=int, default=None, help="shuffling seed of --calib (default 0)")
    p.add_argument("--max-length", type=int, default=None, help="token cap per sample (default 1024)")
    p.add_argument("--device", default=None, help="compute device: cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--output", default=None, help="output folder (required)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output folder")
    p.add_argument(
        "--format",
        choices=("compressed-tensors", "fake-quant"),
        default=None,
        help="write OUTPUT as this export format (qig export; run files in OUTPUT/qig/)",
    )
    p.add_argument("--scales", default=None, help="apply a saved search.safetensors instead of searching")
    p.add_argument("--seed", type=int, default=None, help="torch seed of the run (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward (default 16)")
    p.add_argument("--report", action="store_true", help="also write token maps of the search's weights to OUT/report")
    search = p.add_argument_group("search (awq, mbq, qig)")
    search.add_argument("--n-grid", type=int, default=None, help="scale candidates (default 20)")
    search.add_argument("--loss", choices=("mae", "mse"), default=None, help="per-token error (default mae)")
    search.add_argument("--grad-batch-size", type=int, default=None, help="MBQ: samples per backward (default 4)")
    search.add_argument("--alpha", type=float, default=None, help="SmoothQuant migration strength (default 0.5)")
    search.add_argument("--baseline", choices=("quantized", "zero"), default=None, help="QIG reference x'")
    search.add_argument("--clip", choices=("iqr", "none"), default=None, help="QIG token-score clipping")
    search.add_argument(
        "--tokens", choices=("all", "vision+answer"), default=None, help="QIG: tokens attributed (default all)"
    )
    search.add_argument("--steps", type=int, default=None, help="QIG quadrature points (default 2; compat 32)")
    search.add_argument("--quadrature", choices=("gauss-legendre", "riemann"), default=None, help="QIG path rule")
    search.add_argument(
        "--compat",
        action="store_true",
        default=None,
        help="QIG: the official code's choices (x'=0, 32-pt Riemann, ...; W-A: x'=x^q, no clipping, f(x^q))",
    )
    search.add_argument("--no-progress", action="store_true", help="no progress bars")
    gptq = p.add_argument_group("gptq (--method gptq, or --quantizer gptq after a search)")
    gptq.add_argument("--quantizer", choices=("rtn", "gptq"), default=None, help="awq/mbq/qig: after the search")
    gptq.add_argument(
        "--token-weights", choices=TOKEN_WEIGHTS, default=None, help="gptq: Hessian token weights (default uniform)"
    )
    gptq.add_argument("--block-size", type=int, default=None, help="GPTQ columns per lazy update (default 128)")
    gptq.add_argument("--damp", type=float, default=None, help="GPTQ dampening, relative to mean diag H (default 0.01)")
    gptq.add_argument("--act-order", action="store_true", default=None, help="GPTQ: columns by decreasing diag H")
    p.set_defaults(func=run)
    return p


def resolve_options(args) -> dict:
    """Flags over recipe over defaults; unknown recipe keys are refused."""
    recipe = {}
    if args.recipe:
        recipe = _read_recipe(args.recipe)
    opts = {}
    for key, default in _OPTIONS.items():
        flag = getattr(args, key, None)
        opts[key] = flag if flag is not None else recipe.get(key, default)
    return opts


def _read_recipe(path: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise QigError(f"recipe {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise QigError(f"recipe {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise QigError(f"recipe {path} must be a mapping of options (e.g. 'method: qig'), got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(_OPTIONS))
    if unknown:
        raise QigError(f"recipe {path} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_OPTIONS)}")
    return data


def resolve_group_size(opts: dict) -> int | None:
    """``--group-size`` as given; left out: 128 for weight-only modes, per-channel for W-A modes (abits < 16)."""
    if opts["group_size"] is None:
        return 128 if opts["abits"] == 16 else None
    return parse_group_size(opts["group_size"])


def parse_group_size(value) -> int | None:
    """``--group-size``: an integer, or 'channel' (also per-channel/none/0) for one scale per output row."""
    if value is None or str(value).lower() in ("channel", "per-channel", "none", "0"):
        return None
    try:
        return int(value)
    except ValueError:
        raise QigError(f"--group-size {value!r} must be an integer such as 128, or 'channel'") from None


def build_config(opts: dict):
    from qig.methods import make_config

    name = opts["method"]
    if name not in METHODS:
        raise QigError(f"method {name!r} is not supported; use one of: {', '.join(METHODS)}")
    _check_gptq_options(name, opts)
    if name == "gptq":
        return _gptq_config(opts)
    fields = dict(wbits=opts["wbits"], abits=opts["abits"], group_size=resolve_group_size(opts), seed=opts["seed"])
    fields["batch_size"] = opts["batch_size"]
    if opts["alpha"] is not None and name != "smoothquant":
        raise QigError(f"--alpha is a SmoothQuant option; method {name} takes none (use --method smoothquant)")
    if name == "smoothquant":
        if opts["alpha"] is not None:
            fields["alpha"] = opts["alpha"]
    elif name != "rtn":
        fields.update(n_grid=opts["n_grid"], loss=opts["loss"])
        if opts["quantizer"] == "gptq":
            fields.update(quantizer="gptq", gptq=_gptq_settings(opts))
    if name == "mbq":
        fields["grad_batch_size"] = opts["grad_batch_size"]
    if name == "qig":
        if opts["steps"] is not None:
            fields["steps"] = opts["steps"]
        if opts["quadrature"] is not None:
            fields["quadrature"] = opts["quadrature"]
        if opts["tokens"] is not None:
            fields["tokens"] = opts["tokens"]
        if opts["compat"]:
            # The preset fixes x', clipping and the quadrature; --steps / --quadrature may still override.
            return make_config("qig", preset="compat", **fields)
        fields.update(baseline=opts["baseline"], clip=opts["clip"])
    elif _qig_flags_given(opts):
        raise QigError(f"{QIG_FLAGS} are QIG options; method {name} takes none of them")
    return make_config(name, **fields)


QIG_FLAGS = "--compat, --steps, --quadrature and --tokens"


def _qig_flags_given(opts: dict) -> bool:
    given = (opts["compat"], opts["steps"] is not None, opts["quadrature"] is not None, opts["tokens"] is not None)
    return any(given)


_GPTQ_FLAGS = {"block_size": "--block-size", "damp": "--damp", "act_order": "--act-order"}


def _check_gptq_options(name: str, opts: dict) -> None:
    """Refuse GPTQ flags that contradict the method, saying what goes together."""
    quantizer, weights = opts["quantizer"], opts["token_weights"]
    if name == "rtn" and quantizer == "gptq":
        raise QigError("--quantizer gptq follows a scale search (awq, mbq, qig); for GPTQ alone use --method gptq")
    if name == "gptq" and quantizer == "rtn":
        raise QigError("--method gptq quantizes with GPTQ; drop --quantizer rtn (or use --method rtn)")
    given = [flag for key, flag in _GPTQ_FLAGS.items() if opts[key] not in (None, False)]
    if given and name != "gptq" and quantizer != "gptq":
        raise QigError(f"{', '.join(given)} are GPTQ options; use them with --method gptq or --quantizer gptq")
    if weights is not None and name != "gptq":
        raise QigError(
            f"--token-weights weights GPTQ's Hessian and goes with --method gptq; method {name} weights its "
            "search by its own token weights (its --quantizer gptq uses the plain Hessian)"
        )


def _gptq_settings(opts: dict):
    from qig.quant.gptq import GPTQSettings

    return GPTQSettings(**{key: opts[key] for key in _GPTQ_FLAGS if opts[key] not in (None, False)})


def _gptq_config(opts: dict):
    """``--method gptq [--token-weights awq|mbq|qig]``: the weighting method's config is built from the same flags."""
    from qig.methods import GPTQConfig

    weights = opts["token_weights"] or "uniform"
    weighting = None
    if weights == "uniform":
        if _qig_flags_given(opts):
            raise QigError(f"{QIG_FLAGS} are QIG options; with --method gptq add --token-weights qig")
    else:
        inner = {**opts, "method": weights, "quantizer": None, "token_weights": None}
        inner.update({key: None for key in _GPTQ_FLAGS})
        weighting = build_config(inner)
    return GPTQConfig(
        wbits=opts["wbits"],
        abits=opts["abits"],
        group_size=resolve_group_size(opts),
        seed=opts["seed"],
        batch_size=opts["batch_size"],
        gptq=_gptq_settings(opts),
        token_weights=weighting,
    )


def run(args) -> int:
    import qig
    from qig.api import config_from_dict, load_scales, summary_table, versions, write_output
    from qig.calib import embedded_calibration, load_calibration
    from qig.evaluate import load_model_and_processor
    from qig.models import family_for

    opts = resolve_options(args)
    if not opts["output"]:
        raise QigError("--output is required (the folder to write the quantized model into)")
    if Path(opts["output"]).exists() and not opts["overwrite"]:
        raise QigError(f"output folder {opts['output']} already exists; pass --overwrite to replace it")
    if opts["n_samples"] <= 0:
        raise QigError(f"--n-samples must be positive, got {opts['n_samples']}")
    if getattr(args, "report", False):
        from qig.tokenmaps.render import require_matplotlib

        require_matplotlib()
        if opts["scales"] or opts["method"] == "rtn":
            raise QigError("--report shows the token weights of a search; rtn and --scales runs have none")
    timings: dict[str, float] = {}
    scales = None
    if opts["scales"]:
        scales, saved = load_scales(opts["scales"])
        if saved is not None and args.wbits is None and args.group_size is None and args.abits is None:
            # The saved run's quantizer, unless the flags say otherwise.
            config = config_from_dict(saved)
            log.info("applying %s with the saved run's quantizer %s", opts["scales"], config.spec.label())
        else:
            config = build_config(opts)
    else:
        config = build_config(opts)

    if opts["format"]:
        from qig.export import check_format

        check_format(opts["format"], config.spec, config.abits)  # refuse before any work
    t = time.perf_counter()
    model, processor = load_model_and_processor(opts["model"], trust_remote_code=bool(opts["trust_remote_code"]))
    timings["load"] = time.perf_counter() - t

    calib = None
    if scales is None and config.name != "rtn":
        t = time.perf_counter()
        family = family_for(model)
        kw = dict(
            n_samples=opts["n_samples"],
            max_length=opts["max_length"],
            image_seq_length=family.image_seq_length(model),
            image_token_id=family.vision_token_id(model, processor),
        )
        if opts["calib"]:
            calib = load_calibration(
                opts["calib"], processor, image_folder=opts["image_folder"], seed=opts["calib_seed"], **kw
            )
        else:
            calib = embedded_calibration(processor, **kw)
        timings["calibration_data"] = time.perf_counter() - t

    t = time.perf_counter()
    result = qig.quantize(model, config, calib, device=opts["device"], scales=scales, progress=not args.no_progress)
    timings["quantize"] = time.perf_counter() - t
    result.applied_from = opts["scales"]
    timings.update({f"quantize/{k}": v for k, v in result.timings.items()})
    report = {
        "config": config.to_dict(),
        "options": opts,
        "versions": versions(),
        "n_calibration_samples": len(calib) if calib is not None else 0,
        "timings": timings,
    }
    if opts["format"]:
        from qig.export import export_after

        def write(tmp):
            return write_output(tmp, model, processor, result, report)

        out = export_after(write, opts["output"], opts["format"], overwrite=bool(opts["overwrite"]))
    else:
        out = write_output(opts["output"], model, processor, result, report, overwrite=bool(opts["overwrite"]))
    if getattr(args, "report", False):
        from qig.tokenmaps import write_run_report

        write_run_report(result, calib, processor, model.config, out / "report")
    print(summary_table(result))
    print(f"wrote {config.name} {config.label()} model to {out}")
    return 0
