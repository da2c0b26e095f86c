"""How ``qig quantize`` scales with depth and tokens: real LLaVA-OneVision dimensions, random weights (a benchmark).

    python benchmarks/scale.py                                    # rtn awq qig gptq mbq x depth 6 12 24, 1x1 grid
    python benchmarks/scale.py --methods rtn awq --depths 6 24 --tokens 1x1 3x3 --n-samples 4 --n-grid 4
    python benchmarks/scale.py --device cuda --extra=--model-offload=disk --extra=--offload-streams=cpu
    python benchmarks/scale.py --decoder qwen2-7b --depths 2 --n-samples 128 --device cuda   # 7B layers
    python benchmarks/scale.py --paper                            # the 7B / 72B extrapolation only, no runs
    python benchmarks/scale.py --methods rtn awq --depths 6 24 --extra=--model-offload=disk --eval-offload disk
    python benchmarks/scale.py --methods rtn --depths 6 24 --extra=--model-offload=disk --export-offload disk

Models (``benchmarks/_random_models.py``): transformers' ``LlavaOnevisionConfig``
with a ``Qwen2Config`` decoder at Qwen2-0.5B's dimensions (hidden 896, 14 / 2
heads, intermediate 4864; ``--decoder qwen2-7b`` for 7B's) at each depth, a
2-layer SigLIP tower at the real width (1152, patch 14, 384 px), the embedded
tokenizer (75 words: the embedding is negligible) and OneVision's processor.
``--tokens`` picks the anyres grid, so the tokens per sample: 1x1 gives 1485
vision tokens per image (the base view, one tile, 27 row newlines), 2x2 3699,
3x3 7371 (anyres_max_9's ceiling), plus the embedded caption's text. Models are
built once into ``--cache`` and reused.

Each (method, depth, grid) is one ``qig quantize`` in a fresh process
(``benchmarks/_child.py``: ``qig.cli.main`` plus the peak-memory report), one
at a time, on the embedded world's calibration split rendered by the model's
processor. Measured: the quantize phase per decoder layer (``report.json``
timings: capture, any pre-pass and the layer loop, over the depth), wall
seconds of the whole run (load, calibration, quantize, save), the child's peak
resident memory (``os.wait4``'s ``ru_maxrss``: the whole process, interpreter
included) and, on CUDA, ``torch.cuda.max_memory_allocated``. ``--extra`` flags
go to every ``qig quantize`` unchanged (e.g. ``--extra=--model-offload=disk``).
Flags that only some methods take are given only to those: ``--n-samples`` and
``--max-length`` to the calibrated ones, ``--n-grid`` to the searches.

``--eval-offload none|disk|auto`` adds the next step of the flow: each
quantized folder is scored by ``qig eval --model-offload ...`` in its own
process (``--eval-limit`` questions of the embedded split, ``--reference none``),
and its peak RSS is reported beside the quantize run's, with its ratio over
the smallest depth. ``--export-offload none|disk|auto`` does the same for
``qig export --format compressed-tensors --model-offload ...`` of each
fake-quant folder (run before the eval). With
``--extra=--format=compressed-tensors`` the quantize run itself ends with the
export (streamed when the run is: ``--extra=--model-offload=disk``).

``--paper`` prints, without running anything, the memory and FLOP estimates
for LLaVA-OneVision-7B and -72B (128 samples, bf16, one 80 GB GPU), each
with its formula.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _random_models import (  # noqa: E402  (benchmarks/, the script's own folder)
    DECODERS,
    FULL_DEPTH,
    GRIDS,
    PATCHES,
    VOCAB,
    decoder_layer_params,
    onevision_config,
    vision_tokens,
)
from _rows import gptq_rows, method_rows, row_flags  # noqa: E402

GIB = 2**30
DEFAULT_METHODS = ["rtn", "awq", "qig", "gptq", "mbq"]
MAX_LENGTH = 32768  # the built models' max_position_embeddings; the cap only cuts, so it never binds here


def uses_calibration(row: str) -> bool:
    return row_flags(row)[1] != "rtn"


def takes(row: str, key: str) -> bool:
    """Whether the row's ``--method`` takes the option ``key`` (read from the configs' fields)."""
    from qig.methods.config import methods_with

    return row_flags(row)[1] in methods_with(key)


@dataclass
class Run:
    """One ``qig quantize`` in its own process, and what it measured."""

    method: str
    depth: int
    grid: str
    decoder: str
    n_samples: int
    device: str
    argv: list[str]
    rc: int | None = None
    wall_s: float | None = None
    quantize_s: float | None = None  # report.json's "quantize" phase
    s_per_layer: float | None = None  # quantize_s / depth
    peak_rss_bytes: int | None = None  # os.wait4's ru_maxrss of the child
    cuda_peak_allocated_bytes: int | None = None
    cuda_peak_reserved_bytes: int | None = None
    tokens_per_sample: float | None = None  # real tokens, mean over the calibration samples (None: rtn)
    vision_per_sample: float | None = None
    timings: dict = field(default_factory=dict)
    error: str | None = None
    eval_rc: int | None = None  # qig eval of the quantized folder (--eval-offload)
    eval_wall_s: float | None = None
    eval_peak_rss_bytes: int | None = None
    export_rc: int | None = None  # qig export of the quantized folder (--export-offload)
    export_wall_s: float | None = None
    export_peak_rss_bytes: int | None = None


def model_folder(cache: Path, decoder: str, depth: int, grid: str, vision_layers: int, seed: int) -> Path:
    """Build (once) and return the cached random model for these settings.

    The model is built in a process of its own: a child forked from a parent that
    held it would start with the parent's resident memory, and Linux keeps that
    peak in the child's ``ru_maxrss`` across ``exec`` (the runs' peak RSS would
    then grow with the depth of the model this process built).
    """
    folder = cache / f"onevision-{decoder}-L{depth}-{grid}-v{vision_layers}-s{seed}"
    argv = [str(folder), "--layers", str(depth), "--decoder", decoder, "--grid", grid]
    argv += ["--vision-layers", str(vision_layers), "--seed", str(seed)]
    subprocess.run([sys.executable, str(HERE / "_random_models.py"), *argv], check=True, stdout=subprocess.DEVNULL)
    return folder


def quantize_argv(args, row: str, folder: Path, output: Path) -> list[str]:
    """The ``qig quantize`` arguments of one run."""
    argv = ["quantize", "--model", str(folder), *row_flags(row), "--wbits", str(args.wbits)]
    argv += ["--group-size", str(args.group_size), "--device", args.device]
    if uses_calibration(row):
        argv += ["--calib", "embedded", "--n-samples", str(args.n_samples), "--max-length", str(MAX_LENGTH)]
    if args.n_grid is not None and takes(row, "n_grid"):
        argv += ["--n-grid", str(args.n_grid)]
    argv += ["--output", str(output), "--overwrite", "--no-progress"]
    for extra in args.extra:
        argv += shlex.split(extra)
    return argv


def run_child(argv: list[str], log_dir: Path) -> tuple[int, float, int, dict | None, str]:
    """Run ``_child.py argv`` alone; (exit code, wall s, peak RSS bytes from wait4, its report, stderr tail)."""
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, str(HERE / "_child.py"), *argv], stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here; tell Popen so it does not wait again
    report = None
    for line in reversed(out_path.read_text().splitlines()):
        if line.startswith("QIG_PEAK "):
            report = json.loads(line[len("QIG_PEAK ") :])
            break
    tail = "\n".join(err_path.read_text().splitlines()[-15:])
    return child.returncode, wall, usage.ru_maxrss * 1024, report, tail  # ru_maxrss: KiB on Linux


def calibration_tokens(output: Path) -> tuple[float, float] | None:
    """Mean real and vision tokens per calibration sample, from the run's ``search.safetensors`` roles."""
    from safetensors.torch import load_file

    from qig.calib import PAD, VISION

    path = output / "search.safetensors"
    if not path.is_file():
        return None
    roles = load_file(path).get("roles")
    if roles is None:
        return None
    n = roles.shape[0]
    return float((roles != PAD).sum()) / n, float((roles == VISION).sum()) / n


def measure(args, row: str, depth: int, grid: str) -> Run:
    """Build (or reuse) the model, quantize it in a child process, read what it measured."""
    folder = model_folder(Path(args.cache), args.decoder, depth, grid, args.vision_layers, args.seed)
    with tempfile.TemporaryDirectory(prefix="qig-scale-", dir=args.scratch) as tmp:
        tmp = Path(tmp)
        output = tmp / "out"
        argv = quantize_argv(args, row, folder, output)
        run = Run(row, depth, grid, args.decoder, args.n_samples, args.device, argv)
        rc, wall, rss, child, tail = run_child(argv, tmp)
        run.rc, run.wall_s, run.peak_rss_bytes = rc, wall, rss
        if child is not None:
            run.cuda_peak_allocated_bytes = child["cuda_peak_allocated_bytes"]
            run.cuda_peak_reserved_bytes = child["cuda_peak_reserved_bytes"]
        if rc != 0:
            run.error = tail or f"exit {rc}"
            return run
        run_files = output / "qig" if (output / "qig" / "report.json").is_file() else output  # --format: OUT/qig
        report = json.loads((run_files / "report.json").read_text())
        run.timings = report["timings"]
        run.quantize_s = run.timings.get("quantize")
        run.s_per_layer = run.quantize_s / depth if run.quantize_s is not None else None
        tokens = calibration_tokens(run_files)
        if tokens is not None:
            run.tokens_per_sample, run.vision_per_sample = tokens
        if args.export_offload is not None:
            argv = ["export", "--input", str(output), "--output", str(tmp / "exported")]
            if not next_step(run, "export", [*argv, "--model-offload", args.export_offload], tmp):
                return run
        if args.eval_offload is not None:
            argv = ["eval", "--model", str(output), "--model-offload", args.eval_offload, "--device", args.device]
            argv += ["--limit", str(args.eval_limit), "--batch-size", str(args.eval_limit), "--reference", "none"]
            next_step(run, "eval", argv, tmp)
    return run


def next_step(run: Run, step: str, argv: list[str], tmp: Path) -> bool:
    """Run the flow's next command (``export`` or ``eval``) in its own process; its exit code, seconds and peak
    RSS go to ``run.<step>_rc`` / ``_wall_s`` / ``_peak_rss_bytes``. False (and ``run.error``) if it failed."""
    (tmp / step).mkdir()
    rc, wall, rss, _, tail = run_child(argv, tmp / step)
    setattr(run, f"{step}_rc", rc)
    setattr(run, f"{step}_wall_s", wall)
    setattr(run, f"{step}_peak_rss_bytes", rss)
    if rc != 0:
        run.error = tail or f"{step} exit {rc}"
    return rc == 0


def medians(runs: list[Run]) -> list[Run]:
    """Per (method, depth, grid) one row: the median of each measured quantity over its successful repeats."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.rc == 0:
            groups.setdefault((r.grid, r.depth, r.method), []).append(r)
    out = []
    for rs in groups.values():
        row = Run(rs[0].method, rs[0].depth, rs[0].grid, rs[0].decoder, rs[0].n_samples, rs[0].device, rs[0].argv, 0)
        for name in ("wall_s", "s_per_layer", "peak_rss_bytes", "cuda_peak_allocated_bytes", "tokens_per_sample"):
            row_values = [getattr(r, name) for r in rs if getattr(r, name) is not None]
            setattr(row, name, statistics.median(row_values) if row_values else None)
        for step in ("export", "eval"):
            values = [r for r in rs if getattr(r, f"{step}_rc") == 0]
            if values:
                setattr(row, f"{step}_rc", 0)
                for name in ("wall_s", "peak_rss_bytes"):
                    setattr(row, f"{step}_{name}", statistics.median(getattr(r, f"{step}_{name}") for r in values))
        row.vision_per_sample = rs[0].vision_per_sample
        out.append(row)
    return out


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def format_table(runs: list[Run]) -> str:
    """One row per run; RSS x: peak RSS over the same method and grid's at the smallest depth that ran."""
    base: dict[tuple[str, str], Run] = {}
    for r in runs:
        key = (r.method, r.grid)
        if r.rc == 0 and r.peak_rss_bytes and (key not in base or r.depth < base[key].depth):
            base[key] = r
    width = max(8, *(len(r.method) for r in runs))
    evals = any(r.eval_peak_rss_bytes for r in runs)
    exports = any(r.export_peak_rss_bytes for r in runs)
    head = (
        f"{'method':<{width}} {'depth':>5} {'grid':>4} {'tok/sample':>10} {'vision':>6} {'s/layer':>8} "
        f"{'wall s':>7} {'peak RSS GiB':>12} {'RSS x':>6} {'dev peak GiB':>12} {'decoder bf16 GiB':>16}"
    )
    if exports:
        head += f" {'export wall s':>13} {'export RSS GiB':>14} {'export x':>8}"
    if evals:
        head += f" {'eval wall s':>11} {'eval RSS GiB':>12} {'eval x':>6}"
    lines = [head]
    for r in runs:
        b = base.get((r.method, r.grid))
        ratio = f"{r.peak_rss_bytes / b.peak_rss_bytes:>6.2f}" if b and r.peak_rss_bytes else f"{'-':>6}"
        eval_ratio = f"{'-':>6}"
        if b and b.eval_peak_rss_bytes and r.eval_peak_rss_bytes:
            eval_ratio = f"{r.eval_peak_rss_bytes / b.eval_peak_rss_bytes:>6.2f}"
        tok = f"{r.tokens_per_sample:>10.0f}" if r.tokens_per_sample else f"{'-':>10}"
        vis = f"{r.vision_per_sample:>6.0f}" if r.vision_per_sample else f"{'-':>6}"
        spl = f"{r.s_per_layer:>8.2f}" if r.s_per_layer is not None else f"{'-':>8}"
        wall = f"{r.wall_s:>7.1f}" if r.wall_s is not None else f"{'-':>7}"
        decoder = r.depth * decoder_layer_params(r.decoder) * 2  # the checkpoint's weights, as saved
        line = (
            f"{r.method:<{width}} {r.depth:>5} {r.grid:>4} {tok} {vis} {spl} {wall} "
            f"{_gib(r.peak_rss_bytes):>12} {ratio} {_gib(r.cuda_peak_allocated_bytes):>12} {_gib(decoder):>16}"
        )
        if exports:
            export_ratio = f"{'-':>8}"
            if b and b.export_peak_rss_bytes and r.export_peak_rss_bytes:
                export_ratio = f"{r.export_peak_rss_bytes / b.export_peak_rss_bytes:>8.2f}"
            export_wall = f"{r.export_wall_s:>13.1f}" if r.export_wall_s is not None else f"{'-':>13}"
            line += f" {export_wall} {_gib(r.export_peak_rss_bytes):>14} {export_ratio}"
        if evals:
            eval_wall = f"{r.eval_wall_s:>11.1f}" if r.eval_wall_s is not None else f"{'-':>11}"
            line += f" {eval_wall} {_gib(r.eval_peak_rss_bytes):>12} {eval_ratio}"
        if r.rc != 0:
            line += f"  FAILED (exit {r.rc})"
        lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------ the paper extrapolation (estimates)


@dataclass(frozen=True)
class PaperModel:
    name: str
    decoder: str

    @property
    def dims(self) -> dict:
        return DECODERS[self.decoder]


PAPER_MODELS = (PaperModel("LLaVA-OneVision-7B", "qwen2-7b"), PaperModel("LLaVA-OneVision-72B", "qwen2-72b"))
TEXT_TOKENS = 100  # ~ a caption or a question and its answer
PAPER_TOKENS = {
    f"{PATCHES} + {TEXT_TOKENS} (one 384 view)": PATCHES + TEXT_TOKENS,
    f"{vision_tokens('3x3')} + {TEXT_TOKENS} (anyres 3x3)": vision_tokens("3x3") + TEXT_TOKENS,
}


def layer_flops(d: dict, T: int) -> dict[str, float]:
    """FLOPs per token of one decoder layer's parts: attention block (linears + scores), MLP, down_proj alone."""
    h, i = d["hidden_size"], d["intermediate_size"]
    kv = h // d["num_attention_heads"] * d["num_key_value_heads"]
    attn_linear = 2 * (2 * h * h + 2 * h * kv)  # q, o: h x h; k, v: h x kv
    scores = 4 * T * h  # QK^T and AV, 2 T h each, full (non-causal) upper bound
    mlp = 2 * 3 * h * i
    return {"attn": attn_linear + scores, "mlp": mlp, "down": 2 * h * i}


def method_flops(d: dict, N: int, T: int) -> dict[str, float]:
    """Estimated FLOPs per decoder layer of each method's calibration (see ``paper_table`` for the formulas)."""
    from qig.methods import QIGConfig

    cfg = QIGConfig(wbits=3)
    K, n_grid = cfg.steps, cfg.n_grid
    h, i = d["hidden_size"], d["intermediate_size"]
    f = {k: N * T * v for k, v in layer_flops(d, T).items()}  # over the calibration set
    LF = f["attn"] + f["mlp"]  # one layer forward
    blocks = f["attn"] + f["mlp"] + f["down"]  # the inspected blocks of attn_in, mlp_in, mlp_out (GQA: no attn_out)
    inputs = 2 * f["attn"] + 2 / 3 * f["mlp"]  # the layer run up to each group's first linear
    awq = LF + inputs + (n_grid + 1) * blocks
    qig = awq + LF + inputs + 6 * K * blocks  # x^q stream and inputs; K points x (f, f_q) x (fwd + 2 bwd)
    hessian = 2 * N * T * (3 * h * h + i * i)  # X^T X for the inputs of q/k/v, o, gate/up (h wide), down (i wide)
    kv = h // d["num_attention_heads"] * d["num_key_value_heads"]
    outs_ins = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    solve = 4 / 3 * (3 * h**3 + i**3) + sum(2 * o * c * c for o, c in outs_ins)
    gptq = LF + inputs + hessian + solve  # x^q stream, staged forwards, Hessians, Cholesky + column updates
    return {
        "rtn": 0.0,
        "awq": awq,
        "mbq": awq + 4 * LF,  # layer-wise gradient pass: forward, recomputed forward with grad, backward
        "qig": qig,
        "gptq": gptq,
        "gptq+qig": gptq + LF + inputs + 6 * K * blocks,
        "LF": LF,  # one layer forward, for scale
    }


PLAN_METHODS = ("awq", "qig", "gptq")


def meta_onevision(decoder: str, grid: str):
    """LLaVA-OneVision with ``decoder``'s dimensions, full depth and real vocabulary, on the meta device (bf16)."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    config = onevision_config(FULL_DEPTH[decoder], decoder, grid, vision_layers=26)
    config.text_config.vocab_size = VOCAB[decoder]
    with torch.device("meta"):
        return LlavaOnevisionForConditionalGeneration._from_config(config, dtype=torch.bfloat16)


def plan_lines(decoder: str, n_samples: int, tokens: int, gpu_gib: float) -> list[str]:
    """qig's own memory plan (``qig.pipeline.plan.shape_plan``, ``--offload-streams auto``) of AWQ, QIG and GPTQ.

    W4 g128, the methods' defaults; where a plan passes the share of the GPU that ``auto`` keeps
    (``DEVICE_SHARE``), the largest chunk that stays within it (``--batch-tokens``: fewer samples
    per forward; the search adds the chunks' losses, so it scores the same candidates).
    """
    from qig.methods import method_for
    from qig.methods.config import make_config
    from qig.models import family_for
    from qig.pipeline.plan import DEVICE_SHARE, GROUP_INPUTS, STREAMS, gib, shape_plan

    model = meta_onevision(decoder, "1x1")  # the grid changes the processor only; the plan takes T
    family = family_for(model)
    out = ["    qig's memory plan (offload auto), device and host peak, what waits on the host:"]
    for name in PLAN_METHODS:
        for b in (None, 8, 4, 2, 1):
            budget = None if b is None else b * tokens
            config = make_config(name, wbits=4, batch_tokens=budget)
            plan = shape_plan(model, family, n_samples, tokens, config, method_for(config), int(gpu_gib * GIB))
            fits = plan.on("device") <= gpu_gib * GIB
            if plan.on("device") <= DEVICE_SHARE * gpu_gib * GIB or b == 1:
                break
        host = [w for w, p in (("streams", STREAMS), ("group inputs", GROUP_INPUTS)) if plan.on_host(p)]
        decoder_bytes = next(v for k, v in plan.items.items() if k.startswith("decoder layers"))
        chunk = f"--batch-tokens {budget} ({b} samples/chunk)" if budget else "default chunks"
        out.append(
            f"      {name:<5} {gib(plan.on('device')):>10} {'fits' if fits else 'EXCEEDS'} {gpu_gib:.0f}, "
            f"host {gib(plan.on('host') - decoder_bytes)} + decoder; {chunk}; "
            f"on the host: {', '.join(host) or 'nothing'}"
        )
    return out


def paper_table(n_samples: int = 128, gpu_gib: float = 80.0, tflops: float = 400.0) -> str:
    """Memory and FLOP estimates for LLaVA-OneVision-7B / -72B in bf16 (estimates, formulas printed)."""
    from qig.methods import QIGConfig

    cfg = QIGConfig(wbits=3)
    K, b, n_grid = cfg.steps, cfg.batch_size, cfg.n_grid
    N, B = n_samples, 2  # samples, bytes per bf16 value
    lines = [
        f"ESTIMATES, not measurements: {N} calibration samples, bf16 (2 bytes), one {gpu_gib:.0f} GB GPU; "
        f"QIG {K}-node {cfg.quadrature} path, chunks of {b} samples (QIGConfig batch_size), AWQ n_grid {n_grid}.",
        "Formulas (N samples, T tokens per sample, h hidden, i intermediate, P weights per layer, L layers, V vocab):",
        "  stream       = N T h 2 bytes (x; QIG, GPTQ and W-A runs carry x^q too: 2 streams)",
        "  layer        = P 2 bytes;  decoder = L P 2;  embed + lm_head = 2 V h 2",
        "  group input  = N T i 2 (down_proj's input, the widest; QIG also holds it on x^q)",
        "  Hessian      = in^2 4 bytes (fp32) per distinct linear input: 3 of h^2 (q/k/v, o, gate/up) + i^2 (down)",
        f"  QIG path     = {K} nodes x {b} samples: z = {K} {b} T h 2; MLP block, f and f_q: ~6 [{K * b}, T, i] "
        "tensors kept for the backward (gate, up, act*up): 6 K b T i 2",
        "  FLOPs/token/layer = 2 P_linear + 4 T h (scores, non-causal upper bound); LF = N T that = one layer forward",
        f"  AWQ  = LF (x) + group inputs (2 attn + 2/3 mlp) + (n_grid+1 = {n_grid + 1}) x (attn + mlp + down blocks)",
        "  MBQ  = AWQ + 4 LF (qig.pipeline.gradients: forward, recomputed with grad, backward ~2 LF; per layer)",
        "  MBQ stored inputs = L N T h 2 bytes on the host (every layer's input, for the layer-wise backward)",
        f"  QIG  = AWQ + LF (x^q) + group inputs on x^q + 6 K (= {6 * K}) x blocks (K points, f and f_q, fwd + 2 bwd)",
        "  GPTQ = LF (x^q) + staged inputs + Hessians 2 N T (3 h^2 + i^2) + 4/3 in^3 Cholesky/inverse per Hessian"
        " + 2 out in^2 column updates per linear",
        f"  hours = L x FLOPs/layer / {tflops:.0f} TFLOP/s (an ASSUMED sustained rate, not measured)",
        "  everything on the device = the working sets above with every stream and group input on the GPU;",
        "  qig's memory plan = what qig quantize itself plans (qig.pipeline.plan, as qig plan prints it): the",
        "    streams, then the group inputs and reference outputs wait on the host when the GPU is short, one chunk",
        "    on the device at a time; host = what waits there, besides the decoder (on disk with --model-offload disk)",
        "",
    ]
    for m in PAPER_MODELS:
        d = m.dims
        h, i, L, V = d["hidden_size"], d["intermediate_size"], FULL_DEPTH[m.decoder], VOCAB[m.decoder]
        P = decoder_layer_params(m.decoder)
        lines.append(
            f"{m.name}: Qwen2 decoder h {h}, i {i}, {d['num_attention_heads']}/{d['num_key_value_heads']} heads, "
            f"{L} layers, vocab {V}; P = {P / 1e6:.0f} M weights per layer"
        )
        lines.append(
            f"  weights: layer {P * B / GIB:.2f} GiB, decoder {L * P * B / GIB:.1f} GiB, "
            f"embed + lm_head {2 * V * h * B / GIB:.2f} GiB; host: all {(L * P + 2 * V * h) * B / GIB:.0f} GiB "
            f"loaded whole, or the rest + one layer ({(P + 2 * V * h) * B / GIB:.1f} GiB) with --model-offload disk"
        )
        h2 = h * h * 4
        lines.append(
            f"  GPTQ Hessians: {h2 / GIB:.3f} GiB each for q/k/v, o, gate/up; down_proj {i * i * 4 / GIB:.2f} GiB "
            f"(~3x that while factorising: H, its Cholesky factor, H^-1)"
        )
        for label, T in PAPER_TOKENS.items():
            stream, group = N * T * h * B, N * T * i * B
            z, path = K * b * T * h * B, 6 * K * b * T * i * B
            layer = P * B
            working = {
                "awq": layer + stream + group + stream,  # x, the group input, y_ref
                "qig": layer + 2 * stream + 2 * group + stream + path,  # x and x^q, both group inputs, the path
                "gptq": layer + stream + group + 3 * i * i * 4,  # x^q, the stage input, Hessian factorisation
            }
            plans = plan_lines(m.decoder, N, T, gpu_gib)
            lines += [
                f"  T = {T} tokens per sample ({label}):",
                f"    {'stream x / x and x^q':<36} {stream / GIB:8.2f} / {2 * stream / GIB:.2f} GiB",
                f"    {'down_proj group input x / with x^q':<36} {group / GIB:8.2f} / {2 * group / GIB:.2f} GiB",
                f"    {'QIG path z / MLP path activations':<36} {z / GIB:8.2f} / {path / GIB:.2f} GiB",
                f"    {'MBQ stored layer inputs (host)':<36} {L * stream / GIB:8.1f} GiB (L streams, for its backward)",
                f"    {'everything on the device, per layer':<36} "
                + ", ".join(
                    f"{k} {v / GIB:.0f} GiB ({'fits' if v / GIB < gpu_gib else 'EXCEEDS'} {gpu_gib:.0f})"
                    for k, v in working.items()
                ),
                *plans,
                f"    {'method':<10} {'TFLOP/layer':>12} {'PFLOP, all layers':>18} {f'h at {tflops:.0f} TFLOP/s':>18}",
            ]
            for k, v in method_flops(d, N, T).items():
                if k != "rtn":
                    lines.append(
                        f"    {k:<10} {v / 1e12:>12.0f} {L * v / 1e15:>18.1f} {L * v / (tflops * 1e12) / 3600:>18.2f}"
                    )
        lines.append("")
    lines.append(
        "Not counted: the vision tower and projector (run once at capture), attention masks, allocator slack, "
        "the checkpoint's own shards; FLOPs for the embedding and lm_head (MBQ's pre-pass has them: 2 V h per token)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=method_rows() + gptq_rows())
    p.add_argument("--depths", nargs="+", type=int, default=[6, 12, 24])
    p.add_argument("--tokens", nargs="+", default=["1x1"], choices=list(GRIDS), help="anyres grids (tokens/sample)")
    p.add_argument("--decoder", choices=list(DECODERS), default="qwen2-0.5b", help="decoder dimensions")
    p.add_argument("--vision-layers", type=int, default=2, help="SigLIP layers kept (the real tower has 26)")
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--n-grid", type=int, default=None, help="scale candidates of the searches (default: config's)")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--extra", action="append", default=[], help="flags for every qig quantize (--extra=--flag=v)")
    p.add_argument(
        "--eval-offload",
        choices=["none", "disk", "auto"],
        default=None,
        help="also qig eval each output, decoder read so",
    )
    p.add_argument(
        "--export-offload",
        choices=["none", "disk", "auto"],
        default=None,
        help="also qig export each fake-quant output to compressed-tensors, decoder read so",
    )
    p.add_argument("--eval-limit", type=int, default=2, help="questions qig eval scores (one batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1, help="run every setting N times, interleaved; report medians")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "qig-scale-models"))
    p.add_argument("--scratch", default=None, help="where the runs' output folders go (default: the temp dir)")
    p.add_argument("--json", default=None, help="write every run here")
    p.add_argument("--paper", action="store_true", help="print the 7B / 72B extrapolation only (no runs)")
    p.add_argument("--paper-samples", type=int, default=128)
    p.add_argument("--paper-gpu-gib", type=float, default=80.0)
    p.add_argument("--paper-tflops", type=float, default=400.0, help="assumed sustained rate for the hours")
    args = p.parse_args(argv)
    if args.paper:
        print(paper_table(args.paper_samples, args.paper_gpu_gib, args.paper_tflops))
        return 0
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    d = DECODERS[args.decoder]
    print(
        f"LLaVA-OneVision, random weights: {args.decoder} decoder (h {d['hidden_size']}, i {d['intermediate_size']}, "
        f"{d['num_attention_heads']}/{d['num_key_value_heads']} heads, "
        f"{decoder_layer_params(args.decoder) / 1e6:.1f} M weights per layer), SigLIP {args.vision_layers} layers "
        f"at 1152 / patch 14 / 384; W{args.wbits} g{args.group_size}, {args.n_samples} samples, "
        f"device {args.device}, extra {args.extra or 'none'}"
        + (f"; qig export --model-offload {args.export_offload}" if args.export_offload else "")
        + (f"; qig eval --model-offload {args.eval_offload}, {args.eval_limit} questions" if args.eval_offload else ""),
        flush=True,
    )
    runs: list[Run] = []
    # interleaved: every setting once, then again, so that a drift of the machine hits each alike
    settings = [(grid, depth, row) for grid in args.tokens for depth in sorted(args.depths) for row in args.methods]
    for grid, depth, row in settings * args.repeat:
        run = measure(args, row, depth, grid)
        runs.append(run)
        status = "ok" if run.rc == 0 else f"FAILED (exit {run.rc})"
        spl = f"{run.s_per_layer:.2f} s/layer, " if run.s_per_layer is not None else ""
        print(
            f"{row} depth {depth} grid {grid}: {status}, {spl}wall {run.wall_s:.1f} s, "
            f"peak RSS {_gib(run.peak_rss_bytes)} GiB"
            + (f", export peak RSS {_gib(run.export_peak_rss_bytes)} GiB" if run.export_rc is not None else "")
            + (f", eval peak RSS {_gib(run.eval_peak_rss_bytes)} GiB" if run.eval_rc is not None else ""),
            file=sys.stderr,
            flush=True,
        )
        if run.error:
            print(run.error, file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")
    print(format_table(runs))
    if args.repeat > 1:
        print(f"\nmedian of {args.repeat} runs:")
        print(format_table(medians(runs)))
    failed = [r for r in runs if r.rc != 0 or r.eval_rc not in (None, 0) or r.export_rc not in (None, 0)]
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(f"{r.method}@{r.depth}/{r.grid}" for r in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
