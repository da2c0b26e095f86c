"""``qig export``: a ``qig quantize`` folder as compressed-tensors (vLLM, transformers) or plain fake-quant.

    qig export --input out/qig-w4 --format compressed-tensors --output out/qig-w4-ct
    qig export --input out/qig-w4 --format fake-quant --output out/qig-w4-fq --dtype bfloat16

Settings the format cannot hold are refused before anything is written; the
output folder appears only when the export is complete. See docs/export.md.
"""

from __future__ import annotations

import argparse

from qig.export import FORMATS


def register(sub) -> argparse.ArgumentParser:
    from qig.export.writer import DTYPES

    p = sub.add_parser("export", help="write a quantized folder as compressed-tensors (vLLM) or fake-quant")
    p.add_argument("--input", required=True, help="the --output folder of 'qig quantize'")
    p.add_argument("--format", choices=FORMATS, default="compressed-tensors", help="default compressed-tensors")
    p.add_argument("--output", required=True, help="the folder to write")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="unquantized parts (default: the input's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from qig.export import export

    result = export(args.input, args.output, fmt=args.format, overwrite=args.overwrite, dtype=args.dtype)
    print(summary(result))
    return 0


def summary(result) -> str:
    """Two or three lines: what was written where, and what can serve it."""
    lines = [f"wrote {result.format} model to {result.path}"]
    if result.scheme is not None:
        lines[0] += f" ({result.scheme.format})"
        lines.append(result.scheme.serving)
    n, kept = len(result.linears), len(result.ignored)
    lines.append(f"{n} decoder linears quantized, {kept} linears kept in full precision")
    return "\n".join(lines)
