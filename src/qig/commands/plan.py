"""``qig plan``: a dry run on a checkpoint's shapes before any GPU hour (``qig.preflight``; no weights are read).

    qig plan --model path/to/Qwen2.5-VL-72B-Instruct --method awq --wbits 4 --group-size 128
    qig plan --model path/to/Qwen2-VL-7B-Instruct --method qig --wbits 3 --image-size 1344x1344
    qig plan --model path/to/llava-1.5-7b-hf --sample-tokens 700 --device-memory 40 --json

The folder needs the checkpoint's ``config.json`` (and its ``preprocessor_config.json``
for the vision-token count). Prints the decoder layer's scale groups with their shapes,
whether the group size divides every quantized linear (or the one-line refusal ``qig
quantize`` would give), the tensor-parallel degrees vLLM would refuse for the export, the
vision tokens of one image at the given size, and the memory plan on one GPU. The method
flags are ``qig quantize``'s (one declaration, in the method configs); ``--n-samples``,
``--method`` and ``--offload-streams`` are its run options.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from qig.commands.flags import add_flag, add_flags, from_args, given
from qig.commands.quantize import RUN_OPTIONS, _add_method_flag
from qig.errors import QigError
from qig.hub import revision_option
from qig.methods.config import CONFIGS, all_options, config_from_options, methods_with, preset_names
from qig.options import check_fields, option
from qig.preflight import DEFAULT_DEVICE_MEMORY, DEFAULT_IMAGE_SIZE, DEFAULT_TEXT_TOKENS

IMAGE_SIZE = "{}x{}".format(*DEFAULT_IMAGE_SIZE)

SHARED_RUN_OPTIONS = ("method", "n_samples", "offload_streams")  # qig quantize's run options that change the plan


@dataclass(frozen=True)
class PlanOptions:
    """What ``qig plan`` reads besides the method's config and the shared run options; each field is a flag."""

    model: str = option(
        None,
        "model folder holding the checkpoint's config.json, or a hub id (its JSON files only)",
        required=True,
        path=True,
    )
    revision: str | None = revision_option()
    image_size: str | None = option(
        None, f"one calibration image, WIDTHxHEIGHT (default {IMAGE_SIZE}); its vision tokens come from its processor"
    )
    sample_tokens: int | None = option(None, "tokens per calibration sample, instead of --image-size", min=1)
    text_tokens: int = option(DEFAULT_TEXT_TOKENS, "text tokens per sample beside its image (template, caption)", min=0)
    device_memory: float = option(
        DEFAULT_DEVICE_MEMORY / 2**30, "memory of the one GPU the plan is for, in GiB", min=1e-3, max=2**20
    )
    json: bool = option(False, "print the report as JSON")

    def __post_init__(self) -> None:
        check_fields(self)


def register(p: argparse.ArgumentParser) -> None:
    """Flags of ``qig plan`` on ``p`` (the subparser ``qig.cli`` made for it)."""
    p.description = "Reads config.json (and preprocessor_config.json) only; no weights. Method flags as qig quantize."
    add_flags(p, PlanOptions)
    for key in SHARED_RUN_OPTIONS:
        add_flag(p, RUN_OPTIONS[key])
    methods = p.add_argument_group("method options (in brackets: which methods take it, where not all)")
    for key, opt in all_options().items():
        _add_method_flag(methods, opt, methods_with(key))  # qig quantize's method flags, declared once
    for preset in preset_names():  # as qig quantize offers them
        holders = methods_with(preset)
        doc = getattr(CONFIGS[holders[0]], preset).__doc__.strip().splitlines()[0]
        methods.add_argument(f"--{preset}", action="store_true", default=None, help=f"{doc} [{', '.join(holders)}]")
    p.set_defaults(func=run)


def parse_image_size(value: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` as (width, height).

    >>> parse_image_size("1344x896")
    (1344, 896)
    """
    parts = value.lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise QigError(f"--image-size {value!r} must be WIDTHxHEIGHT in pixels, e.g. 1344x1344")
    return int(parts[0]), int(parts[1])


def run(args) -> int:
    from qig.methods.base import needs_calibration
    from qig.preflight import preflight

    opts = from_args(args, PlanOptions)
    run_opts = given(args, {k: RUN_OPTIONS[k] for k in SHARED_RUN_OPTIONS})
    method = run_opts.get("method", RUN_OPTIONS["method"].field.default)
    method_opts = given(args, all_options())
    method_opts.update({p: True for p in preset_names() if getattr(args, p, False)})
    config = config_from_options(method, method_opts)  # refuses what qig quantize refuses
    calibration = [k for k in ("n_samples", "image_size", "sample_tokens", "text_tokens") if _given(args, k)]
    if calibration and not needs_calibration(config):
        flags = ", ".join("--" + k.replace("_", "-") for k in calibration)
        raise QigError(f"{flags}: {config.name} uses no calibration data; drop them")
    if opts.sample_tokens is not None and (opts.image_size is not None or hasattr(args, "text_tokens")):
        raise QigError(
            "--sample-tokens gives the whole sample; drop --image-size and --text-tokens, or drop --sample-tokens"
        )
    image = parse_image_size(opts.image_size or IMAGE_SIZE)
    report = preflight(
        opts.model,
        config,
        n_samples=run_opts.get("n_samples"),
        image_size=image,
        tokens=opts.sample_tokens,
        text_tokens=opts.text_tokens,
        device_memory=int(opts.device_memory * 2**30),
        offload_streams=run_opts.get("offload_streams", "auto"),
        revision=opts.revision,
    )
    print(json.dumps(report.to_dict(), indent=1) if opts.json else report.describe())
    if report.refusal:  # printed with the rest; qig quantize would stop here
        raise QigError(report.refusal)
    return 0


def _given(args, key: str) -> bool:
    return hasattr(args, key)
