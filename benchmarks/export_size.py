"""Size of a compressed-tensors export: the quantized LM linears' bytes against their FP16 size (a benchmark).

    python benchmarks/export_size.py                       # RTN W4A16 g128 of the embedded model
    python benchmarks/export_size.py --wbits 8 --abits 8   # W8A8 (int-quantized)
    python benchmarks/export_size.py --input out/qig-w4    # an existing 'qig quantize' folder

Counts every decoder linear's stored weight tensors (packed codes, scales,
zero points, shape) against 2 bytes per weight; biases are left out of both.
The issue's target for W4 g128 is at most 0.30x.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from qig.cli import main as qig
from qig.export.size import linear_bytes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=None, help="a 'qig quantize' folder (default: quantize the embedded model)")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--abits", type=int, default=16)
    p.add_argument("--group-size", default=None, help="default 128 weight-only, per-channel for W-A")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qig-export-size-") as tmp:
        run = Path(args.input) if args.input else Path(tmp) / "run"
        if args.input is None:
            flags = ["--method", "rtn", "--wbits", str(args.wbits), "--abits", str(args.abits)]
            if args.group_size is not None:
                flags += ["--group-size", args.group_size]
            if qig(["quantize", *flags, "--no-progress", "--output", str(run)]) != 0:
                return 1
        out = Path(tmp) / "ct"
        if qig(["export", "--input", str(run), "--output", str(out)]) != 0:
            return 1
        stored, fp16 = linear_bytes(out)
    print(f"LM linears: {stored / 2**20:.3f} MiB stored vs {fp16 / 2**20:.3f} MiB FP16: {stored / fp16:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
