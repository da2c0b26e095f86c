"""Calibration cost of RTN, SmoothQuant, AWQ, MBQ, QIG and GPTQ: wall time and peak memory, as ratios (a benchmark).

    python benchmarks/calibration_time.py                       # W3A16 g128, 128 samples, embedded model
    python benchmarks/calibration_time.py --repeats 3 --device cuda
    python benchmarks/calibration_time.py --methods awq gptq gptq+qig awq+gptq
    python benchmarks/calibration_time.py --wbits 4 --abits 8    # W4A8: rtn, smoothquant, awq, mbq, qig
    python benchmarks/calibration_time.py --nproc 2 --methods awq qig gptq   # 1 vs 2 processes (torchrun)

The rows come from the method registry (``qig.methods.CONFIGS``): by default
every method except GPTQ whose config accepts the setting; ``--methods`` also
takes the GPTQ rows (``gptq``, ``gptq+<w>``, ``<w>+gptq`` for each
token-weighting method w).

Ratios are to AWQ in weight-only settings and to MBQ in W-A settings (``--base``
to choose); W-A runs also print QIG's calibration time (the ``quantize`` phase:
search and quantization, without loading and saving) over MBQ's W-A search
and over SmoothQuant's.

Rows with GPTQ also print GPTQ's time per decoder layer (Hessians and the
column-by-column quantization, from the run's search.json).

``--nproc N`` runs every row twice, interleaved: in one process and under
``torchrun --nproc-per-node N`` (data-parallel calibration, ``qig.dist``), and
prints the 1 -> N ratio of the calibration time. On a CPU the N processes share
its cores (each gets 1/N of the threads), so the ratio there says little about
N GPUs.

Each run is the whole ``qig quantize`` flow (load, calibration data, search,
quantization, save) in a fresh subprocess, so peak memory is per method: the
process's peak resident memory (VmHWM) on CPU, ``torch.cuda.max_memory_allocated``
on CUDA. Methods are run interleaved (rtn, awq, mbq, qig, rtn, ...) so that
machine load drifts affect them alike; the median over repeats is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _rows import gptq_rows, method_rows, row_flags  # noqa: E402  (benchmarks/, the script's own folder)


def default_rows(wbits: int, abits: int, group_size: str | None) -> list[str]:
    """Every method row whose config accepts the setting (e.g. smoothquant only with abits below 16)."""
    from qig.commands.quantize import parse_group_size
    from qig.errors import QigError
    from qig.methods import make_config

    group = parse_group_size(group_size) if group_size is not None else (128 if abits == 16 else None)
    rows = []
    for row in method_rows():
        try:
            make_config(row, wbits=wbits, abits=abits, group_size=group)
        except QigError:
            continue
        rows.append(row)
    return rows


def _vm_hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def child(args) -> int:
    """One end-to-end run; prints a JSON line."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    from qig.cli import main as cli_main

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    main_rank = os.environ.get("RANK", "0") == "0"
    with tempfile.TemporaryDirectory() as own:
        tmp = args.child_output or own  # under torchrun every rank writes (rank 0) and reads the same folder
        argv = ["quantize", *row_flags(args.child), *_setting_flags(args, calibrated(args.child))]
        argv += ["--output", os.path.join(tmp, "out"), "--no-progress"]
        t = time.perf_counter()
        with open(os.devnull, "w") as devnull:
            stdout, sys.stdout = sys.stdout, devnull
            try:
                rc = cli_main(argv)
            finally:
                sys.stdout = stdout
        seconds = time.perf_counter() - t
        if rc != 0 or not main_rank:
            return rc
        report = json.load(open(os.path.join(tmp, "out", "report.json")))
        summary = json.load(open(os.path.join(tmp, "out", "search.json")))["method_summary"]
    gptq_layers = summary.get("gptq", {}).get("seconds_per_layer")
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else _vm_hwm_mib()
    print(
        json.dumps(
            {
                "method": args.child,
                "rc": rc,
                "seconds": seconds,
                "peak_mib": peak,
                "timings": report["timings"],
                "gptq_seconds_per_layer": gptq_layers,
            }
        )
    )
    return rc


def calibrated(row: str) -> bool:
    """Whether a row reads calibration data (RTN does not, and ``qig quantize`` refuses --n-samples for it)."""
    from qig.methods import CONFIGS, RTNConfig

    name = "gptq" if "gptq" in row.split("+") else row
    return not issubclass(CONFIGS[name], RTNConfig)


def _setting_flags(args, calibration: bool = True) -> list[str]:
    """The flags shared by the benchmark and the ``qig quantize`` run of each row."""
    flags = ["--wbits", str(args.wbits), "--abits", str(args.abits)]
    flags += ["--group-size", str(args.group_size)] if args.group_size is not None else []
    flags += ["--n-samples", str(args.n_samples)] if calibration else []
    flags += ["--device", args.device]
    return flags + (["--model", args.model] if args.model else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument(
        "--methods", nargs="+", default=None, choices=method_rows() + gptq_rows(), help="default: per --abits"
    )
    p.add_argument("--wbits", type=int, default=3)
    p.add_argument("--abits", type=int, default=16, help="16: weight-only; e.g. 8 for W4A8 (per-channel weights)")
    p.add_argument("--group-size", default=None, help="default 128 for weight-only, per-channel for W-A")
    p.add_argument("--base", default=None, help="the row ratios are taken to (default awq; mbq in W-A settings)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the median is reported")
    p.add_argument("--json", default=None, help="write all runs here")
    p.add_argument("--nproc", type=int, default=1, help="also run each row in N processes (torchrun); 1 -> N ratio")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-output", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.methods is None:
        args.methods = default_rows(args.wbits, args.abits, args.group_size)
    if args.base is None:
        args.base = "mbq" if args.abits < 16 else "awq"

    procs = [1] if args.nproc <= 1 else [1, args.nproc]
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    parallel: dict[str, list[dict]] = {m: [] for m in args.methods}
    for r in range(args.repeats):
        for m in args.methods:
            for n in procs:
                out = _run_child(m, n, args)
                (runs if n == 1 else parallel)[m].append(out)
                if n > 1:
                    print(f"repeat {r} {m} x{n}: {out['seconds']:.1f}s", file=sys.stderr, flush=True)
            per_layer = out.get("gptq_seconds_per_layer")
            gptq = f", GPTQ {statistics.mean(per_layer):.2f}s/layer" if per_layer else ""
            out = runs[m][-1]
            line = f"repeat {r} {m}: {out['seconds']:.1f}s, peak {out['peak_mib']:.0f} MiB{gptq}"
            print(line, file=sys.stderr, flush=True)
    print(format_table(runs, args))
    if args.nproc > 1:
        print(format_parallel(runs, parallel, args.nproc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


def _run_child(method: str, nproc: int, args) -> dict:
    """One row in a fresh process (or ``nproc`` of them under torchrun): its JSON line."""
    with tempfile.TemporaryDirectory() as tmp:
        script = [os.path.abspath(__file__), "--child", method, "--child-output", tmp, *_setting_flags(args)]
        if nproc == 1:
            cmd = [sys.executable, *script]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *script]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{method} x{nproc} failed (exit {proc.returncode})")
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def format_parallel(single: dict[str, list[dict]], parallel: dict[str, list[dict]], n: int) -> str:
    """The 1 -> n process ratio per row, end to end and of the quantize phase (medians)."""
    lines = [f"{'method':<10} {'1 process':>10} {f'{n} processes':>12} {'ratio':>6} {'quantize 1':>11} {f'{n}':>7}"]
    for m in single:
        a = statistics.median(r["seconds"] for r in single[m])
        b = statistics.median(r["seconds"] for r in parallel[m])
        qa = statistics.median(r["timings"].get("quantize", 0.0) for r in single[m])
        qb = statistics.median(r["timings"].get("quantize", 0.0) for r in parallel[m])
        lines.append(f"{m:<10} {a:>9.1f}s {b:>11.1f}s {a / b:>6.2f} {qa:>10.1f}s {qb:>6.1f}s")
    return "\n".join(lines)


def format_table(runs: dict[str, list[dict]], args) -> str:
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    mem = {m: statistics.median(r["peak_mib"] for r in rs) for m, rs in runs.items()}
    search = {m: statistics.median(r["timings"].get("quantize", 0.0) for r in rs) for m, rs in runs.items()}
    base = args.base
    base_t, base_q, base_m = med.get(base), search.get(base), mem.get(base)
    x = f"x {base}"
    group = f"g{args.group_size}" if args.group_size is not None else ("g128" if args.abits == 16 else "per-channel")
    width = max(8, *(len(m) for m in runs))
    lines = [
        f"W{args.wbits}A{args.abits} {group}, {args.n_samples} samples, device {args.device}, median of {args.repeats}",
        f"{'method':<{width}} {'end-to-end':>11} {x:>8} {'quantize':>9} {x:>8} {'peak MiB':>9} {x:>8}"
        f" {'GPTQ/layer':>11}",
    ]
    for m in runs:
        rt = f"{med[m] / base_t:>8.2f}" if base_t else f"{'':>8}"
        rq = f"{search[m] / base_q:>8.2f}" if base_q else f"{'':>8}"
        rm = f"{mem[m] / base_m:>8.2f}" if base_m else f"{'':>8}"
        per_layer = [statistics.mean(r["gptq_seconds_per_layer"]) for r in runs[m] if r.get("gptq_seconds_per_layer")]
        gl = f"{statistics.median(per_layer):>10.2f}s" if per_layer else f"{'':>11}"
        lines.append(f"{m:<{width}} {med[m]:>10.1f}s {rt} {search[m]:>8.1f}s {rq} {mem[m]:>9.0f} {rm} {gl}")
    if args.abits < 16 and "qig" in search:
        ratios = [f"{search['qig'] / search[m]:.2f}x {m}" for m in ("mbq", "smoothquant") if search.get(m)]
        if ratios:
            lines.append(f"QIG W-A calibration (quantize phase): {', '.join(ratios)} (acceptance: <= 1.5x mbq)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
