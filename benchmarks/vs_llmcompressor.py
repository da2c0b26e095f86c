"""qig against llm-compressor, side by side: time, CPU time, peak memory and accuracy on the same inputs (a benchmark).

    bash scripts/peer_env.sh                              # once: llm-compressor in .venv-peer
    python benchmarks/vs_llmcompressor.py                 # every setting, 128 samples (real widths: 8), 2 repeats
    python benchmarks/vs_llmcompressor.py --quick         # 8 samples (real widths: 2), 1 repeat, 1 seed: it works
    python benchmarks/vs_llmcompressor.py --settings awq-w4-real gptq-w4-real --cache /tmp/qig-peer-models
    python benchmarks/vs_llmcompressor.py --settings awq-w4 gptq-w4 --phases --threads 2

Settings (``SETTINGS``): AWQ W4 g128, GPTQ W4 g128 and AWQ W3 g128 on the embedded model, AWQ W2 per-channel on
the sinks model (``qig.embedded.sinks_model_dir()``), and AWQ W4 g128 and GPTQ W4 g128 at real widths; against each
llm-compressor AWQ run, qig's AWQ, QIG and MBQ. The real-width model, where compute rather than start-up dominates, is
a random-weight LLaVA in the embedded model's layout with Qwen2-0.5B's decoder widths (hidden 896, intermediate 4864,
14 / 2 heads), ``REAL_LAYERS`` decoder layers and a 2-layer SigLIP tower at its real width on 336 px images (576 image
tokens + the caption per sample), built once into ``--cache`` (``benchmarks/_random_models.py``'s ``build_llava``)
and calibrated on ``--real-samples``; llm-compressor loads it as it loads the embedded model.
Each run is a fresh subprocess with the same thread count (``OMP_NUM_THREADS``), one tool after the other and
interleaved (the order flips every repeat), wall time including start-up; CPU time and peak RSS come from
``os.wait4``. Ratios are qig / llm-compressor, medians over ``--repeats``.

Both tools calibrate on the same records: the embedded world's calibration split written once as LLaVA JSON + PNG
(``qig.embedded.world.write_split``). qig renders them (``qig quantize --calib``); llm-compressor's side
(``benchmarks/_llmc_child.py``, in the peer venv) renders them the way its examples do, and checks its input ids,
pixel values and answer-only loss masks against qig's rendering sample by sample, stopping the benchmark if any
differs. llm-compressor runs with ``use_loss_mask=True`` (AWQ's loss over answer tokens) and batch 16, qig with
batch 16; both write compressed-tensors, and each output is scored by ``qig eval`` (which reads either:
``qig.compressed``) on ``--seeds``; the real-width outputs, whose accuracy means nothing on random weights, by their
fidelity to the FP model instead (``benchmarks/_fidelity.py``: next-token KL and top-1 agreement on ``--fidelity-n``
held-out samples). The run writes ``--json`` and a Markdown table (``--markdown``) with the date, machine and
versions; ``--phases`` adds where each run spent its time (qig: report.json's timings;
llm-compressor: import, load, render, oneshot, save).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
PEER_MARK, QIG_MARK = "LLMC ", "QIG_PEAK "


@dataclass(frozen=True)
class Setting:
    """One llm-compressor run and the qig methods measured against it, on one model."""

    key: str  # --settings name
    label: str
    model: str  # "default", "sinks" or "real"
    wbits: int
    group_size: int | None  # None: per output channel
    peer: str  # llm-compressor's modifier: "awq" or "gptq"
    methods: tuple[str, ...]  # qig's methods


SETTINGS = (
    Setting("awq-w4", "W4 g128", "default", 4, 128, "awq", ("awq", "qig", "mbq")),
    Setting("gptq-w4", "W4 g128", "default", 4, 128, "gptq", ("gptq",)),
    Setting("awq-w3", "W3 g128", "default", 3, 128, "awq", ("awq", "qig", "mbq")),
    Setting("awq-w2-sinks", "W2 per-channel, sinks model", "sinks", 2, None, "awq", ("awq", "qig", "mbq")),
    Setting("awq-w4-real", "W4 g128, real widths", "real", 4, 128, "awq", ("awq", "qig", "mbq")),
    Setting("gptq-w4-real", "W4 g128, real widths", "real", 4, 128, "gptq", ("gptq",)),
)
REAL_DECODER, REAL_LAYERS = "qwen2-0.5b", 4  # the real-width model: Qwen2-0.5B's decoder widths, 4 layers
# Calibration samples on it: one qig AWQ W4 run with 16 took 502 s wall, 591 s CPU (449 s of it the search) on 2
# threads of a 2-core machine shared with another job, one with 2 samples 180 s (search 147 s): about 100 s fixed and
# 20 s per sample there; 8 aim at 2-3 minutes on a quiet machine.
REAL_SAMPLES = 8


def model_dir(name: str, cache: Path) -> Path:
    """The model folder of ``Setting.model``; the real-width one is built into ``cache`` on first use."""
    from _random_models import build_llava

    from qig.embedded import default_model_dir, sinks_model_dir

    if name == "real":
        folder = cache / f"llava-{REAL_DECODER}-L{REAL_LAYERS}"
        return build_llava(folder, REAL_LAYERS, decoder=REAL_DECODER, dtype="float32")  # both tools compute in it
    return sinks_model_dir() if name == "sinks" else default_model_dir()


def n_samples(name: str, args) -> int:
    """Calibration samples on model ``name``: ``--real-samples`` at real widths, else ``--n-samples``."""
    return args.real_samples if name == "real" else args.n_samples


def prepare(work: Path, models: set[str], args) -> dict[str, Path]:
    """For each model: its folder, the calibration records, and qig's rendering of them (the peer's check)."""
    from qig.embedded import world

    files = {}
    for name in sorted(models):
        n = n_samples(name, args)
        calib = work / f"calib-{n}" / "data.json"
        if not calib.is_file():
            world.write_split("calib", calib.parent, n, world.DEFAULT_CALIB_SEED)
        files[f"{name}.model"], files[f"{name}.calib"] = model_dir(name, Path(args.cache)), calib
        files[f"{name}.rendered"], files[f"{name}.order"] = render(files[f"{name}.model"], calib, n, work / name)
    return files


def render(folder: Path, calib: Path, n: int, stem: Path) -> tuple[Path, Path]:
    """qig's rendering of the records (``stem``-rendered.safetensors) and their order (``stem``-order.json)."""
    from safetensors.torch import save_file

    from qig.calib import ANSWER, calibration_for
    from qig.loading import load_model_and_processor

    model, processor = load_model_and_processor(folder)
    samples = calibration_for(model, processor, calib, n_samples=n).samples  # qig quantize's order
    tensors = {}
    for i, s in enumerate(samples):
        tensors[f"{i}.input_ids"] = s.inputs["input_ids"][0].contiguous()
        tensors[f"{i}.pixel_values"] = s.inputs["pixel_values"][0].contiguous()
        tensors[f"{i}.loss_mask"] = (s.roles == ANSWER).long()
    rendered, order = stem.with_name(f"{stem.name}-rendered.safetensors"), stem.with_name(f"{stem.name}-order.json")
    save_file(tensors, rendered)
    order.write_text(json.dumps([s.id for s in samples]))
    return rendered, order


def _measured(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd``; its wall time (start-up included), CPU time, peak RSS and stdout's last marked lines."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "stdout": out,
    }


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}


def run_qig(s: Setting, method: str, files: dict, out: Path, args) -> dict:
    """``qig quantize`` of one method (via benchmarks/_child.py), writing compressed-tensors."""
    group = ["--group-size", str(s.group_size) if s.group_size else "channel"]
    cmd = [sys.executable, str(HERE / "_child.py"), "quantize", "--model", str(files[f"{s.model}.model"])]
    cmd += ["--method", method, "--wbits", str(s.wbits), *group, "--calib", str(files[f"{s.model}.calib"])]
    cmd += ["--n-samples", str(n_samples(s.model, args)), "--batch-size", str(args.batch_size)]
    cmd += ["--format", "compressed-tensors", "--output", str(out), "--overwrite", "--no-progress"]
    run = _measured(cmd, _env(args.threads), out.with_suffix(".log"))
    if run["rc"] != 0:
        raise SystemExit(f"qig {method} {s.key} failed (exit {run['rc']}); see {out.with_suffix('.log')}")
    report = json.loads((out / "qig" / "report.json").read_text())
    run["phases"] = report.get("timings", {})
    run.pop("stdout")
    return run


def run_peer(s: Setting, files: dict, out: Path, args) -> dict:
    """llm-compressor's oneshot (benchmarks/_llmc_child.py) in the peer venv."""
    cmd = [args.peer_python, str(HERE / "_llmc_child.py"), "--model", str(files[f"{s.model}.model"])]
    cmd += ["--calib", str(files[f"{s.model}.calib"]), "--order", str(files[f"{s.model}.order"])]
    cmd += ["--rendered", str(files[f"{s.model}.rendered"]), "--output", str(out), "--modifier", s.peer]
    cmd += ["--wbits", str(s.wbits), "--batch-size", str(args.batch_size)]
    cmd += ["--group-size", str(s.group_size)] if s.group_size else []
    run = _measured(cmd, _env(args.threads), out.with_suffix(".log"))
    if run["rc"] == 3:
        raise SystemExit(f"llm-compressor's rendering differs from qig's: {out.with_suffix('.log').read_text()}")
    if run["rc"] != 0:
        raise SystemExit(f"llm-compressor {s.key} failed (exit {run['rc']}); see {out.with_suffix('.log')}")
    marked = json.loads([line for line in run.pop("stdout").splitlines() if line.startswith(PEER_MARK)][-1][5:])
    run.update(phases=marked["phases"], versions=marked["versions"])
    return run


def accuracy(folder: Path, args) -> list[float]:
    """``qig eval`` accuracy (in %) of a quantized folder on each eval seed."""
    scores = []
    for seed in args.seeds:
        report = folder.with_name(f"{folder.name}-eval-{seed}.json")
        cmd = [sys.executable, "-m", "qig", "eval", "--model", str(folder), "--seed", str(seed)]
        cmd += ["--n", str(args.eval_n), "--reference", "none", "--json", str(report)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(args.threads), cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"qig eval of {folder} failed: {proc.stderr.strip()[-2000:]}")
        scores.append(100 * json.loads(report.read_text())["accuracy"])
    return scores


def score(runs: dict[str, list[dict]], settings: list[Setting], files: dict, args) -> None:
    """Score each run's first output: ``qig eval`` accuracy, or at real widths the fidelity to the FP model."""
    import _fidelity

    model_of = {s.key: s.model for s in settings}
    references = {}
    for key, rs in runs.items():
        name = model_of[key.split("/")[0]]
        if name != "real":
            rs[0]["accuracy"] = accuracy(Path(rs[0]["folder"]), args)
            print(f"{key}: accuracy {statistics.mean(rs[0]['accuracy']):.2f}", file=sys.stderr)
            continue
        if name not in references:
            references[name] = _fidelity.reference(files[f"{name}.model"], args.fidelity_n)
        rs[0]["fidelity"] = _fidelity.score(references[name], Path(rs[0]["folder"]))
        print(f"{key}: fidelity {rs[0]['fidelity']}", file=sys.stderr)


def measure(args, work: Path) -> dict:
    """Every setting's runs, interleaved over the repeats; accuracy (or fidelity) of the first repeat's outputs."""
    settings = [s for s in SETTINGS if s.key in args.settings]
    files = prepare(work, {s.model for s in settings}, args)
    runs: dict[str, list[dict]] = {}
    for r in range(args.repeats):
        for s in settings:
            jobs = [("llm-compressor", None), *(("qig", m) for m in s.methods)]
            for tool, method in jobs if r % 2 == 0 else reversed(jobs):  # the order flips every repeat
                key = f"{s.key}/{tool}" + (f"-{method}" if method else "")
                out = work / "out" / f"{key.replace('/', '-')}-r{r}"
                out.parent.mkdir(parents=True, exist_ok=True)
                run = run_peer(s, files, out, args) if method is None else run_qig(s, method, files, out, args)
                run["folder"] = str(out)
                runs.setdefault(key, []).append(run)
                print(f"repeat {r} {key}: {run['wall_s']:.1f}s wall, {run['cpu_s']:.1f}s CPU", file=sys.stderr)
    score(runs, settings, files, args)
    return {"settings": [asdict(s) for s in settings], "runs": runs}


def environment(result: dict, args) -> dict:
    """Date, machine and versions of both environments."""
    import compressed_tensors
    import torch
    import transformers

    import qig

    cpu = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), platform.processor())
    peer = next((r["versions"] for rs in result["runs"].values() for r in rs if "versions" in r), {})
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
        "threads": args.threads,
        "qig": {
            "qig": getattr(qig, "__version__", "0.1.0"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "compressed-tensors": compressed_tensors.__version__,
        },
        "llm-compressor": peer,
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _median(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def table(result: dict, args) -> str:
    """The Markdown table: one row per qig method against its llm-compressor run."""
    env, runs = result["environment"], result["runs"]
    head = [
        f"{env['date']}, {env['machine']}, {env['threads']} threads per run; qig: "
        + ", ".join(f"{k} {v}" for k, v in env["qig"].items())
        + "; llm-compressor side: "
        + ", ".join(f"{k} {v}" for k, v in env["llm-compressor"].items()),
        f"{args.n_samples} samples on the embedded models, batch {args.batch_size}, median of {args.repeats} "
        f"interleaved repeats; accuracy: mean over seeds {', '.join(map(str, args.seeds))} of {args.eval_n} "
        "questions (qig eval)",
        *_real_note(result, args),
        "",
        "| setting | qig | llm-compressor | time ratio | CPU ratio | peak RSS MiB qig / llmc | accuracy qig / llmc |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for s in result["settings"]:
        peer = runs[f"{s['key']}/llm-compressor"]
        for m in s["methods"]:
            ours = runs[f"{s['key']}/qig-{m}"]
            label = f"{m.upper()} vs their {s['peer'].upper()} {s['label']}"
            if m == s["peer"]:
                label = f"{m.upper()} {s['label']}"
            rows.append(
                f"| {label} | {_median(ours, 'wall_s'):.1f} s | {_median(peer, 'wall_s'):.1f} s "
                f"| {_median(ours, 'wall_s') / _median(peer, 'wall_s'):.2f} "
                f"| {_median(ours, 'cpu_s') / _median(peer, 'cpu_s'):.2f} "
                f"| {_median(ours, 'peak_rss_mib'):.0f} / {_median(peer, 'peak_rss_mib'):.0f} "
                f"| {_quality(ours[0], peer[0])} |"
            )
    return "\n".join(head + rows)


def _real_note(result: dict, args) -> list[str]:
    """The table's line on the real-width rows, if any: their model, samples and fidelity score."""
    if not any(s["model"] == "real" for s in result["settings"]):
        return []
    return [
        f"real widths: random weights, {REAL_DECODER}'s decoder widths, {REAL_LAYERS} layers, {args.real_samples} "
        f"samples of 576 image tokens + caption; instead of accuracy, fidelity to the FP model on {args.fidelity_n} "
        "held-out samples: mean next-token KL(FP || quantized) in nats and top-1 agreement over all positions"
    ]


def _quality(ours: dict, peer: dict) -> str:
    """The accuracy cell: mean accuracies, or at real widths KL and top-1 agreement, qig / llm-compressor."""
    if "fidelity" in ours:
        a, b = ours["fidelity"], peer["fidelity"]
        return f"KL {a['kl']:.4f} / {b['kl']:.4f}, top-1 {a['top1']:.1f} / {b['top1']:.1f} %"
    return f"{statistics.mean(ours['accuracy']):.2f} / {statistics.mean(peer['accuracy']):.2f}"


def phase_table(result: dict) -> str:
    """Where each run spent its time (medians over repeats): qig's report.json timings, llm-compressor's phases."""
    lines = ["| run | wall s | phases (s) |", "|---|---|---|"]
    for key, rs in result["runs"].items():
        names = sorted({p for r in rs for p in r.get("phases", {})})
        phases = ", ".join(f"{p} {statistics.median(r['phases'].get(p, 0.0) for r in rs):.1f}" for p in names)
        lines.append(f"| {key} | {_median(rs, 'wall_s'):.1f} | {phases} |")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    keys = [s.key for s in SETTINGS]
    p.add_argument("--settings", nargs="+", default=keys, choices=keys)
    p.add_argument("--peer-python", default=str(ROOT / ".venv-peer" / "bin" / "python"), help="scripts/peer_env.sh's")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--real-samples", type=int, default=REAL_SAMPLES, help="calibration samples at real widths")
    p.add_argument("--fidelity-n", type=int, default=8, help="held-out samples scoring the real-width outputs")
    p.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "qig-peer-models"),
        help="the real-width model is built and kept here",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; medians are reported")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="eval seeds (default: qig eval's and the 3 next)")
    p.add_argument("--eval-n", type=int, default=1000, help="questions per eval seed")
    p.add_argument("--quick", action="store_true", help="8 (real widths: 2) samples, 1 repeat, small scoring sets")
    p.add_argument("--phases", action="store_true", help="also print where each run spent its time")
    p.add_argument("--workdir", default=None, help="keep the calibration files and outputs here (default: a temp)")
    p.add_argument("--json", default=None, help="default: benchmarks/results/vs_llmcompressor[-quick].json")
    p.add_argument("--markdown", default=None, help="default: the --json path with .md")
    args = p.parse_args(argv)
    from qig.embedded import world

    args.seeds = args.seeds or [world.DEFAULT_EVAL_SEED + i for i in range(4)]
    if args.quick:
        args.n_samples, args.repeats, args.seeds, args.eval_n = 8, 1, args.seeds[:1], 50
        args.real_samples, args.fidelity_n = 2, 2
    name = "vs_llmcompressor-quick" if args.quick else "vs_llmcompressor"
    args.json = args.json or str(HERE / "results" / f"{name}.json")
    args.markdown = args.markdown or str(Path(args.json).with_suffix(".md"))
    if not Path(args.peer_python).is_file():
        p.error(f"{args.peer_python} does not exist; run 'bash scripts/peer_env.sh' first")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = measure(args, work)
    result["environment"] = environment(result, args)
    result["args"] = {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}
    text = table(result, args) + ("\n\n" + phase_table(result) if args.phases else "")
    print(text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
