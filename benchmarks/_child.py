"""Run one ``qig`` command in this process and print its peak memory as JSON on the last line.

    python benchmarks/_child.py quantize --model /tmp/ov-6 --method awq --wbits 4 --output /tmp/x

The command is ``qig.cli.main(argv)``, exactly what ``python -m qig ...``
runs, after :func:`_random_models.allow_onevision_without_torchvision` (a
no-op where torchvision is installed). The last line of stdout is
``QIG_PEAK {"rc": ..., "seconds": ..., "peak_rss_bytes": ..., "cuda_peak_allocated_bytes": ...,
"cuda_peak_reserved_bytes": ...}``; the CUDA entries are null when CUDA was not
initialised. The parent (``benchmarks/scale.py``) also reads the child's peak
RSS from ``os.wait4``, which covers the interpreter's start as well.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

MARK = "QIG_PEAK "


def peak(rc: int, seconds: float) -> dict:
    """This process's peak RSS (ru_maxrss, KiB on Linux) and, if CUDA was used, its peak device memory."""
    out = {
        "rc": rc,
        "seconds": seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_allocated_bytes": None,
        "cuda_peak_reserved_bytes": None,
    }
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        out["cuda_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return out


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _random_models import allow_onevision_without_torchvision

    from qig.cli import main as qig_main

    allow_onevision_without_torchvision()
    start = time.perf_counter()
    try:
        rc = int(qig_main(argv) or 0)
    except SystemExit as exc:  # argparse and signal handlers exit this way
        rc = exc.code if isinstance(exc.code, int) else 1
    seconds = time.perf_counter() - start
    sys.stdout.flush()
    print(MARK + json.dumps(peak(rc, seconds)), flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
