"""``qig export``: a ``qig quantize`` folder in a registered format (``qig.export.formats``).

    qig export --input out/qig-w4 --format compressed-tensors --output out/qig-w4-ct
    qig export --input out/qig-w4 --format fake-quant --output out/qig-w4-fq --dtype bfloat16
    qig export --input out/qig-72b-w4 --output out/qig-72b-w4-ct --model-offload disk   # one layer at a time

The ``--format`` choices are the registered formats (``format_names()``).
Settings the format cannot hold are refused before anything is written; the
output folder appears only when the export is complete. See docs/export.md.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

from qig.commands.flags import add_flags, from_args
from qig.export import format_for, format_names
from qig.options import check_fields, option


def _dtypes() -> tuple[str, ...]:
    from qig.loading import DTYPES

    return ("auto", *DTYPES)


@dataclass(frozen=True)
class ExportOptions:
    """``qig export``'s options; each field is a flag."""

    input: str | None = option(None, "the --output folder of 'qig quantize'", required=True, path=True)
    format: str = option("compressed-tensors", "the format to write", choices=format_names)
    output: str | None = option(None, "the folder to write", required=True, path=True)
    dtype: str = option("auto", "unquantized parts and activations (auto: the input's)", choices=_dtypes)
    model_offload: Literal["auto", "disk", "none"] = option(
        "auto",
        "disk: read one decoder layer at a time and write the output layer by layer, the same bytes (host memory: "
        "the rest of the model and a layer); none: load the whole run; auto: disk when the run passes a quarter of "
        "the available host memory",
    )
    overwrite: bool = option(False, "replace an existing output folder")

    def __post_init__(self) -> None:
        check_fields(self)


def register(p: argparse.ArgumentParser) -> None:
    """Flags of ``qig export`` on ``p`` (the subparser ``qig.cli`` made for it)."""
    p.epilog = _formats_help()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_flags(p, ExportOptions)
    p.set_defaults(func=run)


def _formats_help() -> str:
    """The registered formats, one line each, for ``qig export --help``."""
    names = format_names()
    width = max(map(len, names))
    return "formats:\n" + "\n".join(f"  {n:<{width}}  {format_for(n).help}" for n in names)


def run(args) -> int:
    from qig.export import export

    opts = from_args(args, ExportOptions)  # export() checks the output folder before any work
    dtype = None if opts.dtype == "auto" else opts.dtype
    result = export(
        opts.input,
        opts.output,
        fmt=opts.format,
        overwrite=opts.overwrite,
        dtype=dtype,
        model_offload=opts.model_offload,
    )
    print(summary(result))
    return 0


def summary(result) -> str:
    """Two or three lines: what was written where, and what can serve it."""
    lines = [f"wrote {result.format} model to {result.path}"]
    if result.layout is not None:
        lines[0] += f" ({result.layout})"
    if result.serving is not None:
        lines.append(result.serving)
    n, kept = len(result.linears), len(result.ignored)
    lines.append(f"{n} decoder linears quantized, {kept} linears kept in full precision")
    return "\n".join(lines)
