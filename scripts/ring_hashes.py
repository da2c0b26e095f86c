"""The sha256 of what ``qig quantize`` writes for a fixed set of runs: a refactor that keeps behaviour keeps them.

    .venv/bin/python scripts/ring_hashes.py --out /tmp/hashes-before.json
    ... change the code ...
    .venv/bin/python scripts/ring_hashes.py --out /tmp/hashes-after.json --compare /tmp/hashes-before.json

Runs on the embedded model with 32 calibration samples; prints one line per run
(model.safetensors and search.safetensors) and, with --compare, which differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = {
    "rtn": ["--method", "rtn", "--wbits", "3"],
    "awq": ["--method", "awq", "--wbits", "3", "--n-samples", "32"],
    "mbq": ["--method", "mbq", "--wbits", "3", "--n-samples", "32"],
    "qig": ["--method", "qig", "--wbits", "3", "--n-samples", "32"],
    "gptq": ["--method", "gptq", "--wbits", "3", "--n-samples", "32"],
    "gptq-qig": ["--method", "gptq", "--token-weights", "qig", "--wbits", "3", "--n-samples", "32"],
    "smoothquant-w8a8": ["--method", "smoothquant", "--wbits", "8", "--abits", "8", "--n-samples", "32"],
    "qig-w4a8": ["--method", "qig", "--wbits", "4", "--abits", "8", "--n-samples", "32"],
}
FILES = ("model.safetensors", "search.safetensors")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write the hashes to")
    p.add_argument("--compare", default=None, help="an earlier --out to compare with")
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    args = p.parse_args(argv)
    hashes = {}
    with tempfile.TemporaryDirectory(prefix="qig-hashes-") as tmp:
        for name in args.runs:
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "qig", "quantize", *RUNS[name], "--no-progress", "--output", str(out)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            hashes[name] = {f: sha256(out / f) for f in FILES}
            print(name, " ".join(f"{f}={h[:16]}" for f, h in hashes[name].items()), flush=True)
    Path(args.out).write_text(json.dumps(hashes, indent=1) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = [f"{n}/{f}" for n in hashes for f in FILES if before.get(n, {}).get(f) != hashes[n][f]]
        print("identical" if not differ else "differ: " + ", ".join(differ))
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
