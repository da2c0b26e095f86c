"""``qig quantize``: PTQ of an LVLM with any registered method (RTN, SmoothQuant, AWQ, MBQ, QIG, GPTQ).

    qig quantize --method qig --wbits 3 --group-size 128 --output out/qig-w3
    qig quantize --method qig --wbits 4 --abits 8 --output out/qig-w4a8          # weight-activation W4A8
    qig quantize --method smoothquant --wbits 8 --abits 8 --alpha 0.5 --output out/sq-w8a8
    qig quantize --method gptq --wbits 3 --output out/gptq-w3                   # plain GPTQ
    qig quantize --method gptq --token-weights qig --wbits 3 --output out/g-q   # QIG-weighted Hessian
    qig quantize --method awq --quantizer gptq --wbits 3 --output out/awq-gptq  # AWQ's scales, then GPTQ
    qig quantize --method awq --calib coco/data.json --image-folder coco --output out/awq
    qig quantize --recipe recipe.yaml --output out/run      # flags override the recipe
    qig quantize --scales out/qig-w3/search.safetensors --output out/again

The method flags are derived from the config dataclasses (``qig.methods``):
one flag per field, with the field's help, type and range, and nothing filled
in that was not given, so a flag the chosen method does not take is refused
with the list of those it does. The run flags come from :class:`RunOptions`
the same way. A recipe's keys are the flags' names (``n_grid: 10``).

``--model`` is a folder or a hub id (``--revision``: its branch, tag or
commit), resolved through the Hugging Face cache (``qig.hub``). Without
``--calib`` the embedded world's calibration split is used for the embedded
models only; any other model needs ``--calib`` (a file, folder or hub dataset
id, or ``embedded`` to use the toy world on purpose). OUT holds
the fake-quantized model (``qig eval --model OUT``), ``search.safetensors`` +
``search.json`` and ``report.json``. ``--abits`` below 16 is a weight-activation
mode: weights per output channel (symmetric; no --group-size), activations per
token, quantized at run time (``qig eval`` re-installs their quantizers).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from qig.commands.flags import add_flag, add_flags
from qig.errors import QigError
from qig.job import (
    CALIBRATION_KEYS,
    RUN_OPTIONS,
    SCALE_QUANTIZER_KEYS,
    RunOptions,
    check_run,
    run_job,
)
from qig.methods import needs_calibration
from qig.methods.config import (
    CONFIGS,
    all_options,
    config_from_options,
    methods_with,
    preset_names,
    token_weighting_names,
)
from qig.options import FlatOption, read_recipe

log = logging.getLogger(__name__)


def register(p: argparse.ArgumentParser) -> None:
    """Flags of ``qig quantize`` on ``p`` (the subparser ``qig.cli`` made for it)."""
    p.description = (
        "Flags default to nothing: what is not given is the config's default. "
        "A flag the chosen method does not take is refused."
    )
    p.add_argument("--recipe", default=None, help="YAML file whose keys stand for the flags (e.g. wbits: 3)")
    add_flags(p, RunOptions)
    methods = p.add_argument_group("method options (in brackets: which methods take it, where not all)")
    for key, opt in all_options().items():
        _add_method_flag(methods, opt, methods_with(key))
    for preset in preset_names():
        holders = methods_with(preset)
        doc = getattr(CONFIGS[holders[0]], preset).__doc__.strip().splitlines()[0]
        methods.add_argument(
            f"--{preset}", action="store_true", default=argparse.SUPPRESS, help=f"{doc} [{', '.join(holders)}]"
        )
    p.set_defaults(func=run)


def _add_method_flag(parser, opt: FlatOption, holders: list[str]) -> None:
    """A method option's flag; the methods that take it in brackets when not every method does."""
    suffix = f" [{', '.join(holders)}]" if len(holders) < len(CONFIGS) else ""
    overrides: dict[str, Any] = {}
    if opt.key == "group_size":
        overrides["type"] = group_size_flag
    elif opt.kind.base is not None and dataclasses.is_dataclass(opt.kind.base):  # a borrowed config: a name
        overrides["choices"] = ("uniform", *token_weighting_names())
    add_flag(parser, opt, suffix, **overrides)


def parse_group_size(value) -> int | None:
    """``--group-size``: an integer, or 'channel' (also per-channel/none/0) for one scale per output row."""
    if value is None or str(value).lower() in ("channel", "per-channel", "none", "0"):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise QigError(f"group_size {value!r} must be an integer such as 128, or 'channel'")


def group_size_flag(value: str) -> int | None:
    """``--group-size`` as argparse reads it: 'channel' is None (a flag left out sets nothing, so None is given)."""
    return parse_group_size(value)


def given_options(args) -> dict[str, Any]:
    """The options the user gave: recipe keys, overridden by flags; nothing filled in from defaults.

    A recipe serves every method (docs/reproduce.md), so its calibration keys are
    dropped, with an info line, for a run that takes no data (RTN, ``--scales``);
    the same options given as flags are refused (``check_run``).
    """
    recipe = read_recipe(args.recipe, _known_keys()) if args.recipe else {}
    flags = {key: getattr(args, key) for key in _known_keys() if hasattr(args, key)}  # a flag left out sets nothing
    given = {**recipe, **flags}
    name = given.get("method", RunOptions.method)
    if given.get("scales") is not None or (name in CONFIGS and not needs_calibration(name)):
        unused = [k for k in CALIBRATION_KEYS if k in recipe and k not in flags]
        if unused:
            log.info("recipe %s: %s dropped (this run takes no calibration data)", args.recipe, ", ".join(unused))
        given = {k: v for k, v in given.items() if k not in unused}
    if "group_size" in given:
        given["group_size"] = parse_group_size(given["group_size"])
    return given


def _known_keys() -> list[str]:
    return [*RUN_OPTIONS, *all_options(), *preset_names()]


def split_options(given: dict[str, Any]) -> tuple[RunOptions, dict[str, Any]]:
    """The run's own options (validated) and the method's (validated when its config is built)."""
    run_opts = RunOptions(**{k: v for k, v in given.items() if k in RUN_OPTIONS})
    return run_opts, {k: v for k, v in given.items() if k not in RUN_OPTIONS}


def build_config(run_opts: RunOptions, method_opts: dict[str, Any], saved: dict | None = None):
    """The run's config: from the method options given, or (``--scales``) the saved run's with a new quantizer."""
    if run_opts.scales is None:
        return config_from_options(run_opts.method, method_opts)
    extra = sorted(set(method_opts) - set(SCALE_QUANTIZER_KEYS))
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise QigError(
            f"{flags} do not apply with --scales: the saved scales are applied, not searched; "
            "only --wbits, --abits and --group-size choose the quantizer they are applied with"
        )
    if saved is None:
        return config_from_options(run_opts.method, method_opts)
    from qig.runs import config_from_dict

    if "abits" in method_opts:  # another activation setting: the group size given, or that setting's default
        saved = {k: v for k, v in saved.items() if k != "group_size"}
    return config_from_dict({**saved, **method_opts})


def run(args) -> int:
    """The command; under torchrun every rank runs it, rank 0 writes (``qig.dist``)."""
    from qig import dist

    run_opts, _ = split_options(given_options(args))  # the device (every rank refuses bad options alike)
    return dist.run_on_ranks(run_opts.device, lambda ranks, device: _run(args, ranks, device))


def _run(args, ranks, device: str) -> int:
    from qig.api import summary_table
    from qig.runs import load_clips, load_scales

    given = given_options(args)
    run_opts, method_opts = split_options(given)
    scales = saved = clips = None
    if run_opts.scales:
        scales, saved = load_scales(run_opts.scales)
        clips = load_clips(run_opts.scales) or None
    config = build_config(run_opts, method_opts, saved)
    if saved is not None and not method_opts:
        log.info("applying %s with the saved run's quantizer %s", run_opts.scales, config.spec.label())
    check_run(run_opts, config, given)
    out, result, _ = run_job(run_opts, config, scales, method_opts, ranks, device, clips=clips)
    if out is not None:
        print(summary_table(result))
        print(f"wrote {config.name} {config.label()} model to {out}")
    return 0
