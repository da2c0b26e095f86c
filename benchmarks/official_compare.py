"""qig against the official QIG code, group by group, on the same layers and inputs (a benchmark, not a test).

    python benchmarks/official_compare.py --official-src ~/src/QIG                 # W3A16 g128 and W4A8
    python benchmarks/official_compare.py --official-src ~/src/QIG --settings w3g128 --rows qig-compat
    python benchmarks/official_compare.py --official-src ~/src/QIG --repeats 3 --json out.json

``--official-src`` is an extracted checkout of the official QIG code
(github.com/ucas-xiang/QIG: the folder holding ``qmllm/``); the project ships
none of it. Its ``auto_scale_block`` (W3A16, ``qmllm/methods/qig``),
``auto_scale_block_wa_distort`` (W4A8) and the MBQ code's ``auto_scale_block``
without reweighting (the AWQ baseline, ``qmllm/methods/mbq``) are imported
from there and run on the CPU, unedited (for the duration their ``.cuda()``
calls are no-ops and ``Tensor.cpu()`` copies, as it does from a GPU). Their
inner values (token weights, the loss of each candidate, the chosen ratio,
seconds per phase) are read with a trace function on their nested functions,
from outside.

For each row, qig runs its layer loop (``qig.pipeline.run_layerwise``, all
calibration samples in one batch: the official code's single batch) and, at the
start of each decoder layer, the official code runs on a copy of the same
layer with the same inputs: the layer input on the FP stream, its linears'
inputs captured by a forward pass as the official ``run_qig`` does, the layer's
keyword arguments, the vision / answer masks, and in W4A8 the layer input on
the quantized stream (the official ``inps_distort``).

Rows: ``awq`` (qig's AWQ vs the MBQ code without reweighting, W3 only;
``awq-pads``: qig's AWQ counting pad positions as tokens, as that code does),
``qig-compat`` (``QIGConfig.compat()`` vs the official QIG) and ``qig`` (qig's
defaults vs the official QIG: a speed comparison; its ratios may differ by design).
Per group it prints both chosen ratios, the Spearman (per sample, over real
tokens; mean and min over samples) and max |delta| of the token weights, the
largest relative difference of the candidates' losses, and both codes'
seconds. Per layer and in total: seconds of the token weights and of the
search in each code, and their ratio. ``--repeats R`` runs every row R times
(the official code and qig alternating layer by layer) and reports the median
seconds; the values compared come from the first run.

``--losses`` prints every candidate's loss in both codes. ``--json`` writes
everything.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import linecache
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qig.pipeline.loop import LoopObserver  # noqa: E402  (after the environment it reads)

OFFICIAL_FILES = {
    "qig": "qmllm/methods/qig/quantize/auto_scale.py",
    "qig_wa": "qmllm/methods/qig/quantize/auto_scale_wa_distort.py",
    "mbq": "qmllm/methods/mbq/quantize/auto_scale.py",
}
SEARCHES = ("_search_module_scale", "_search_module_scale_wa_distort")
WEIGHTINGS = ("_compute_token_importance_weights", "_uniform_weights")
SETTINGS = {"w3g128": dict(wbits=3, group_size=128, abits=16), "w4a8": dict(wbits=4, group_size=None, abits=8)}
ROWS = ("awq", "awq-pads", "qig-compat", "qig")


def load_official(src: Path) -> dict:
    """The official modules, imported from ``src`` (the folder holding ``qmllm/``)."""
    missing = [rel for rel in OFFICIAL_FILES.values() if not (src / rel).is_file()]
    if missing:
        raise SystemExit(
            f"--official-src {src}: not an official QIG checkout (missing {', '.join(missing)}); "
            "extract github.com/ucas-xiang/QIG and pass the folder that holds qmllm/"
        )
    sys.path.insert(0, str(src))
    import importlib

    mods = {k: importlib.import_module(rel[:-3].replace("/", ".")) for k, rel in OFFICIAL_FILES.items()}
    return {
        "qig": mods["qig"].auto_scale_block,
        "qig_wa": mods["qig_wa"].auto_scale_block_wa_distort,
        "mbq": mods["mbq"].auto_scale_block,
        "root": str(src.resolve()),
    }


@contextlib.contextmanager
def cpu_only():
    """The official code on the CPU: ``.cuda()`` a no-op, ``Tensor.cpu()`` a copy, as it is from a GPU.

    The official searches save the block's state with ``v.cpu()`` and restore it
    after each candidate; on a CPU tensor ``.cpu()`` would return the tensor
    itself, the candidates' in-place ``weight.mul_(s)`` would reach the saved
    state, and the W-A search would compound every candidate's scale.
    """
    import torch

    saved = torch.nn.Module.cuda, torch.Tensor.cuda, torch.Tensor.cpu
    to_cpu = torch.Tensor.cpu
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.cpu = lambda self, *a, **k: self.clone() if self.device.type == "cpu" else to_cpu(self, *a, **k)
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda, torch.Tensor.cpu = saved


class OfficialTrace:
    """Reads the official search's inner values as it runs: per group call, token weights, losses, ratio, seconds."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.groups: list[dict] = []

    def __call__(self, frame, event, arg):
        code = frame.f_code
        if event != "call" or not code.co_filename.startswith(self.root):
            return None
        if code.co_name in SEARCHES:
            group = {"start": time.perf_counter(), "losses": [], "weights_seconds": 0.0}
            self.groups.append(group)
            return functools.partial(self._search, group)
        if code.co_name in WEIGHTINGS and self.groups:
            frame.f_trace_lines = False
            return functools.partial(self._weights, self.groups[-1], time.perf_counter())
        return None

    def _search(self, group, frame, event, arg):
        if event == "line":  # the W-A search keeps no history: its loss is read where it is compared
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            if line == "if loss < best_error:":
                group["losses"].append(float(frame.f_locals["loss"]))
        elif event == "return":
            local = frame.f_locals
            group["seconds"] = time.perf_counter() - group.pop("start")
            group["ratio"] = float(local["best_ratio"])
            if "history" in local:
                group["losses"] = [float(v[1] if isinstance(v, tuple) else v) for v in local["history"]]
            if "token_w" in local:
                group["weights"] = local["token_w"].detach().float().cpu()
        return functools.partial(self._search, group)

    def _weights(self, group, start, frame, event, arg):
        if event == "return":
            group["weights_seconds"] += time.perf_counter() - start
        return None


def linear_inputs(layer, x, kwargs) -> dict:
    """Each linear's input on a forward of ``layer`` over ``x``, by its path: the official ``input_feat``."""
    import torch

    feats, handles = {}, []
    for name, m in layer.named_modules():
        if isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_hook(lambda _m, a, _o, name=name: feats.__setitem__(name, a[0])))
    try:
        with torch.no_grad():
            layer(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return feats


def run_official(official, setting: str, row: str, layer, chunk, li: int, trace: OfficialTrace) -> float:
    """The official search of one layer on a copy of it; returns its seconds (the linears' inputs included)."""
    import torch

    from qig.calib import ANSWER, VISION

    s = SETTINGS[setting]
    q_config = {"zero_point": True, "q_group_size": s["group_size"] or -1}
    layer = copy.deepcopy(layer)
    kwargs = dict(chunk.layer_kwargs[li])
    masks = {"ans_mask": chunk.roles == ANSWER, "vis_mask": chunk.roles == VISION}
    reweight = {"attn": None, "mlp": None}
    start = time.perf_counter()
    sys.settrace(trace)
    try:
        with cpu_only(), torch.no_grad():
            feats = linear_inputs(layer, chunk.x, kwargs)
            if row.startswith("awq"):
                official["mbq"](layer, kwargs, s["wbits"], q_config, feats, None, None, reweight, loss_mode="mae")
            elif s["abits"] < 16:
                official["qig_wa"](
                    layer, kwargs, s["wbits"], s["abits"], q_config, feats, **masks,
                    reweight_ratio_dict=reweight, q_input=chunk.xq, loss_mode="mae",
                )  # fmt: skip
            else:
                official["qig"](layer, kwargs, s["wbits"], q_config, feats, **masks, reweight_ratio_dict=reweight)
    finally:
        sys.settrace(None)
    return time.perf_counter() - start


def qig_config(setting: str, row: str, n: int):
    from qig.methods import AWQConfig, QIGConfig

    s = SETTINGS[setting]
    common = dict(wbits=s["wbits"], group_size=s["group_size"], abits=s["abits"], batch_size=n)
    if row.startswith("awq"):
        return AWQConfig(**common, pad_tokens="count" if row == "awq-pads" else "skip")
    return QIGConfig.compat(**common) if row == "qig-compat" else QIGConfig(**common)


class Watch(LoopObserver):
    """qig's layer loop observed: at the start of each decoder layer the official code runs on a copy of the
    layer with the same inputs; after each group, qig's values are kept."""

    def __init__(self, official, setting: str, row: str, trace: OfficialTrace) -> None:
        self.official, self.setting, self.row, self.trace = official, setting, row, trace
        self.layers: dict[int, dict] = {}
        self.groups: list[dict] = []

    def layer_started(self, layer, streams) -> None:
        from qig.calib import PAD

        (chunk,) = streams.chunks
        first = len(self.trace.groups)
        seconds = run_official(self.official, self.setting, self.row, layer.module, chunk, layer.index, self.trace)
        self.layers[layer.index] = {
            "official": seconds,
            "official_groups": self.trace.groups[first:],
            "qig": 0.0,
            "real": (chunk.roles != PAD).cpu(),
        }

    def group_visited(self, visit) -> None:
        self.layers[visit.layer.index]["qig"] += visit.seconds
        self.groups.append(
            {
                "layer": visit.layer.index,
                "group": visit.group.name,
                "ratio": visit.record.ratio,
                "weights": visit.record.token_weights,
                "losses": list(visit.found.losses),  # the shared search's, or a method's own (s = 1)
                "seconds": visit.seconds,
                "weights_seconds": visit.phases.get("token_weights", 0.0),  # the loop's own timing of the phase
            }
        )


def run_row(official, setting: str, row: str, model_dir, n_samples: int) -> dict:
    """One row: qig's layer loop, the official search at the start of every layer. Per group records."""
    import torch

    from qig.calib import calibration_for
    from qig.loading import load_model_and_processor
    from qig.pipeline.run import run_layerwise

    model, processor = load_model_and_processor(model_dir, dtype=torch.float32)
    calib = calibration_for(model, processor, n_samples=n_samples)
    config = qig_config(setting, row, len(calib.samples))
    trace = OfficialTrace(official["root"])
    for fn in (official["qig"], official["qig_wa"], official["mbq"]):
        if hasattr(fn, "_layer_idx"):
            del fn._layer_idx  # the official counter starts again with the run
    watch = Watch(official, setting, row, trace)
    run_layerwise(model, config, calib, device="cpu", progress=False, observers=[watch])
    return {"layers": watch.layers, "groups": watch.groups}


def compare(run: dict) -> list[dict]:
    from _ranks import spearman_rows  # benchmarks/, the script's own folder

    """qig's groups beside the official ones, layer by layer (the official code skips no group qig keeps)."""
    rows = []
    by_layer = defaultdict(list)
    for g in run["groups"]:
        by_layer[g["layer"]].append(g)
    for li, mine in sorted(by_layer.items()):
        theirs = run["layers"][li]["official_groups"]
        real = run["layers"][li]["real"]
        if len(theirs) != len(mine):
            raise SystemExit(f"layer {li}: qig searched {len(mine)} groups, the official code {len(theirs)}")
        for q, o in zip(mine, theirs, strict=True):
            row = {"layer": li, "group": q["group"], "qig_ratio": q["ratio"], "official_ratio": o["ratio"]}
            if "weights" in o and q["weights"] is not None:
                rho = spearman_rows(q["weights"], o["weights"], real)
                row.update(
                    spearman_mean=statistics.fmean(rho) if rho else float("nan"),
                    spearman_min=min(rho) if rho else float("nan"),
                    max_abs_delta=float((q["weights"] - o["weights"]).abs().max()),
                )
            lq, lo = q["losses"], o["losses"]
            if len(lq) == len(lo):
                row["loss_rel_delta"] = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(lq, lo, strict=True))
            row.update(
                qig_losses=lq,
                official_losses=lo,
                qig_seconds=q["seconds"],
                official_seconds=o["seconds"],
                qig_weights_seconds=q["weights_seconds"],
                official_weights_seconds=o["weights_seconds"],
            )
            rows.append(row)
    return rows


def report(setting: str, row: str, runs: list[dict], show_losses: bool) -> dict:
    rows = compare(runs[0])
    print(f"\n## {setting} {row}: qig {'compat ' if row == 'qig-compat' else ''}vs the official code")
    print("layer group      ratio qig  official  spearman mean/min  max|dw|   loss rel diff   s qig  s official")
    for r in rows:
        same = "" if r["qig_ratio"] == r["official_ratio"] else "  <- differs"
        rho = f"{r['spearman_mean']:.4f}/{r['spearman_min']:.4f}" if "spearman_mean" in r else "      -      "
        dw = f"{r['max_abs_delta']:.2e}" if "max_abs_delta" in r else "    -   "
        rel = f"{r.get('loss_rel_delta', float('nan')):.2e}"
        print(
            f"{r['layer']:5d} {r['group']:9s} {r['qig_ratio']:9.2f} {r['official_ratio']:9.2f}  {rho:>17s}  {dw}"
            f"  {rel:>14s}  {r['qig_seconds']:6.2f}  {r['official_seconds']:10.2f}{same}"
        )
        if show_losses:
            print("      qig:     ", " ".join(f"{v:.6g}" for v in r["qig_losses"]))
            print("      official:", " ".join(f"{v:.6g}" for v in r["official_losses"]))
    matched = sum(r["qig_ratio"] == r["official_ratio"] for r in rows)
    rhos = [r["spearman_mean"] for r in rows if "spearman_mean" in r and r["spearman_mean"] == r["spearman_mean"]]
    print(
        f"same ratio in {matched} of {len(rows)} groups" + (f"; lowest mean Spearman {min(rhos):.4f}" if rhos else "")
    )
    per_layer = []
    for li in sorted(runs[0]["layers"]):
        off = statistics.median(r["layers"][li]["official"] for r in runs)
        mine = statistics.median(r["layers"][li]["qig"] for r in runs)
        w_off = statistics.median(sum(g["weights_seconds"] for g in r["layers"][li]["official_groups"]) for r in runs)
        w_mine = statistics.median(sum(g["weights_seconds"] for g in r["groups"] if g["layer"] == li) for r in runs)
        per_layer.append({"layer": li, "official": off, "qig": mine, "official_weights": w_off, "qig_weights": w_mine})
    print(f"seconds per layer (median of {len(runs)}; token weights, then the rest of the search):")
    print("layer  official (weights + search)   qig (weights + search)   official / qig")
    for p in per_layer:
        print(
            f"{p['layer']:5d}  {p['official']:8.2f} ({p['official_weights']:.2f} + "
            f"{p['official'] - p['official_weights']:.2f})"
            f"       {p['qig']:8.2f} ({p['qig_weights']:.2f} + {p['qig'] - p['qig_weights']:.2f})"
            f"      {p['official'] / p['qig']:6.2f}x"
        )
    tot_off, tot_mine = sum(p["official"] for p in per_layer), sum(p["qig"] for p in per_layer)
    print(f"total  {tot_off:8.2f}                         {tot_mine:8.2f}                  {tot_off / tot_mine:6.2f}x")
    return {"setting": setting, "row": row, "groups": rows, "seconds": per_layer, "matched": matched}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-src", required=True, type=Path, help="extracted official QIG code (holds qmllm/)")
    p.add_argument("--model", default=None, help="model folder, LLaVA or Qwen2 decoder (default: the embedded model)")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--n-samples", type=int, default=32, help="calibration samples (one batch, as the official code)")
    p.add_argument("--repeats", type=int, default=1, help="runs per row; seconds are their median")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--losses", action="store_true", help="print every candidate's loss in both codes")
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args(argv)
    official = load_official(args.official_src)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"official code: {args.official_src}; {args.n_samples} samples; torch threads {torch.get_num_threads()}")
    results = []
    for setting in args.settings:
        for row in args.rows:
            if row.startswith("awq") and SETTINGS[setting]["abits"] < 16:
                continue  # the MBQ code's AWQ-style search is compared weight-only
            runs = [run_row(official, setting, row, args.model, args.n_samples) for _ in range(args.repeats)]
            results.append(report(setting, row, runs, args.losses))
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=float))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
