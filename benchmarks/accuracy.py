"""Accuracy of FP, RTN, SmoothQuant, AWQ, MBQ, QIG and GPTQ on the embedded visual-QA benchmark (not a test).

    python benchmarks/accuracy.py                              # W3A16 g128 and W4A16 g128, default eval seed
    python benchmarks/accuracy.py --settings w3g128 --eval-seeds 1234 7 99 --limit 500
    python benchmarks/accuracy.py --settings w3g128 w2g64 --methods rtn gptq gptq+qig awq+gptq qig+gptq
    python benchmarks/accuracy.py --settings w4a8 w8a8 w4a4 --eval-seeds 1234 1 2   # weight-activation
    python benchmarks/accuracy.py --settings w4a8 --methods mbq qig "qig[tokens=vision+answer]" --fidelity
    python benchmarks/accuracy.py --dtype float32 bfloat16 --settings w3g128 --methods fp rtn awq gptq
    python benchmarks/accuracy.py --settings W4A16 FP8_DYNAMIC W4AFP8 NVFP4 MXFP4 --eval-seeds 1234 1 2  # --scheme

A setting is also a scheme name (``qig quantize --scheme``: W4A16, W4A16_ASYM,
W8A16, W8A8, FP8_DYNAMIC, W4AFP8, NVFP4A16, NVFP4, MXFP4A16, MXFP4); its rows
run with ``scheme=`` instead of bits. Where RTN does not exist (NVFP4's
activations need calibrated scales), ``awq[n_grid=1]`` (its only candidate is
s = 1: round-to-nearest with the calibrated activation scales) is the
baseline the pooled section measures recovery against.

The rows come from the method registry (``qig.methods.CONFIGS``): by default
fp and every registered method except GPTQ that applies to the setting, i.e.
whose config accepts it (weight-only settings: fp, rtn, awq, mbq, qig;
weight-activation settings ``w4a8``, ``w8a8``, ``w4a4``, with per-channel
symmetric weights and per-token activations: fp, rtn, smoothquant, awq, mbq,
qig). Rows that do not apply to a setting (smoothquant without activation
quantization, GPTQ rows with it)
are skipped with a note. A W-A model is scored as ``qig eval`` scores it:
reloaded from its folder, with its activation quantizers re-installed.

GPTQ rows, one pair per token-weighting method (the registry's
``SearchConfig`` subclasses: awq, mbq, qig): ``gptq`` (plain Hessian),
``gptq+qig`` / ``gptq+mbq`` / ``gptq+awq`` (Hessian weighted by that method's
token weights; AWQ's weigh every token 1, so it is plain GPTQ), ``awq+gptq`` /
``mbq+gptq`` / ``qig+gptq`` (that scale search, then GPTQ as the quantizer);
``--gptq`` adds rtn and every GPTQ row to the selected rows.

Row options: ``qig[tokens=vision+answer]``, ``qig[baseline=zero]``,
``awq[loss=mse]``, ``gptq+qig[attention_steps=3]`` (a GPTQ row's options go
to its token weighting, unless GPTQ has the field) ... run that row's config with these fields changed (values
parsed as JSON where they can be, else taken as text), for ablations side by side.

``--fidelity`` also scores each row against the FP model (answer agreement,
mean KL of the answer tokens' distributions; what ``qig eval --reference``
reports) and prints, per searched row, the share of the token weights that
vision, prompt and answer tokens receive (mean over groups).

With several eval seeds a last section pools them: RTN's loss to FP, the
share of it each row recovers (sum(row - rtn) / sum(fp - rtn) over every
question, delta-method standard error), and each pair's paired accuracy
difference with the mean per-seed KL difference (SE over seeds).
``--model src/qig/assets/tiny-lvlm-sinks`` runs on the embedded model with
massive activations on sink tokens, where the weightings differ.

``--dtype float32 bfloat16`` runs every row in each dtype side by side: the
model is loaded, quantized, saved and scored in that dtype (the same
calibration set for all), and a last table gives, per row and eval seed, the
accuracy in each dtype and its paired difference to the first dtype.

Each method quantizes a fresh copy of the model with the same calibration set
(the embedded calib split unless --calib), the result is saved to a temporary
folder, reloaded from it in the row's dtype (a W-A model with its activation
quantizers, as ``qig eval`` loads it) and scored on each eval seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _rows import gptq_rows, method_rows  # noqa: E402  (benchmarks/, the script's own folder)

FP_ROW = "fp"  # the unquantized model
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_GAP = 0.5  # points: the largest accuracy difference to the first dtype a row may show
# The row recovery is measured against: RTN, or where RTN does not exist (NVFP4) RTN with calibrated activations.
BASELINES = ("rtn", "awq[n_grid=1]")


def baseline_row(rows) -> str | None:
    """The row of ``rows`` recovery is measured against (the first of BASELINES present), or None."""
    return next((b for b in BASELINES if b in rows), None)


def baseline_name(base: str) -> str:
    return "RTN" if base == "rtn" else f"RTN ({base}: calibrated activation scales)"


def all_rows() -> list[str]:
    return [FP_ROW, *method_rows(), *gptq_rows()]


def default_rows(abits: int) -> list[str]:
    """fp and every method row that applies at this activation width."""
    return [FP_ROW, *(row for row in method_rows() if applies(row, abits))]


def split_row(row: str) -> tuple[str, dict]:
    """``"qig[tokens=vision+answer,steps=8]"`` -> ("qig", {"tokens": "vision+answer", "steps": 8})."""
    m = re.fullmatch(r"([a-z0-9_+]+)(?:\[(.*)\])?", row)
    rows = all_rows()
    if not m or m.group(1) not in rows:
        raise SystemExit(f"row {row!r} not understood; use one of {', '.join(rows)}, optionally with [key=value,...]")
    options = {}
    for item in filter(None, (m.group(2) or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"row {row!r}: option {item!r} needs key=value")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return m.group(1), options


def make_row_config(
    row: str,
    wbits: int,
    group: int | None,
    qig_steps: int | None = None,
    abits: int = 16,
    scheme: str | None = None,
):
    """The config of a table row: a method name, "gptq+<weights>" or "<search>+gptq", optionally "[key=value,...]".

    scheme: a ``--scheme`` name instead of wbits / group / abits.
    """
    from qig.methods import GPTQConfig, make_config

    row, options = split_row(row)
    qig_extra = {"steps": qig_steps} if qig_steps else {}
    bits = {"scheme": scheme} if scheme else {"wbits": wbits, "group_size": group, "abits": abits}
    if row.startswith("gptq+"):  # options go to GPTQ where it has them, the rest to the token weighting
        weights = row.split("+", 1)[1]
        extra = qig_extra if weights == "qig" else {}
        return GPTQConfig.weighted_by(weights, **bits, **extra, **options)
    if options:
        return dataclasses.replace(make_row_config(row, wbits, group, qig_steps, abits, scheme), **options)
    if row.endswith("+gptq"):
        search = row.split("+", 1)[0]
        extra = qig_extra if search == "qig" else {}
        return make_config(search, **bits, quantizer="gptq", **extra)
    extra = qig_extra if row == "qig" else {}
    return make_config(row, **bits, **extra)


def scheme_of(setting: str) -> str | None:
    """The ``--scheme`` name a setting is, or None for a bits setting (w3g128, w4a8, ...)."""
    from qig.quant.schemes import SCHEMES

    return setting.upper() if setting.upper() in SCHEMES else None


def parse_setting(text: str) -> tuple[int, int | None, int]:
    """(wbits, group size, abits) of a setting: w3g128, w4a16g128, w4channel; w4a8, w8a8, w4a4 (per-channel);
    or a scheme name (its bits)."""
    if scheme := scheme_of(text):
        from qig.quant.schemes import SCHEMES

        s = SCHEMES[scheme]
        return s.weights.bits, s.weights.group_size, s.abits
    m = re.fullmatch(r"w(\d)(?:a16)?(?:g(\d+)|-?(channel))?", text.lower())
    if m:
        return int(m.group(1)), (int(m.group(2)) if m.group(2) else (None if m.group(3) else 128)), 16
    m = re.fullmatch(r"w(\d)a(\d+)", text.lower())
    if m and int(m.group(2)) < 16:
        return int(m.group(1)), None, int(m.group(2))
    raise SystemExit(f"setting {text!r} not understood; use e.g. w3g128, w4a16g128, w4channel, w4a8, w8a8")


def applies(row: str, abits: int, scheme: str | None = None) -> bool:
    """Whether a row exists at this activation width (or scheme): its config accepts it (SmoothQuant needs
    quantized activations; GPTQ is weight-only; RTN cannot calibrate NVFP4's activation scales)."""
    from qig.errors import QigError

    if split_row(row)[0] == FP_ROW:
        return True
    try:
        make_row_config(row, wbits=4, group=128 if abits == 16 else None, abits=abits, scheme=scheme)
    except QigError:
        return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--settings", nargs="+", default=["w3g128", "w4g128"], help="weight settings, e.g. w3g128")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"table rows (default: per setting): {', '.join(all_rows())}, or row[k=v]",
    )
    p.add_argument("--fidelity", action="store_true", help="also agreement and KL to FP, and token-weight shares")
    p.add_argument("--gptq", action="store_true", help=f"add rtn and {', '.join(gptq_rows())} to the rows")
    p.add_argument("--eval-seeds", nargs="+", type=int, default=None, help="eval split seeds (default: 1234)")
    p.add_argument("--limit", type=int, default=1000, help="questions per eval seed")
    p.add_argument("--n-samples", type=int, default=128, help="calibration samples")
    p.add_argument("--calib", default=None, help="calibration JSON/JSONL (default: embedded calib split)")
    p.add_argument("--calib-seed", type=int, default=None, help="draw of the calibration set (default: qig quantize's)")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--qig-steps", type=int, default=None, help="QIG quadrature points (default: the config's)")
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=DTYPES,
        default=["float32"],
        help="dtype(s) the model is quantized and scored in; several: side by side, differences to the first",
    )
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        help="print the tables of saved --json files (runs on the same eval seeds and questions, merged) instead",
    )
    args = p.parse_args(argv)
    if args.from_json:
        return print_saved(args.from_json)
    for row in args.methods or []:
        split_row(row)  # refuse a bad row before any work
    if args.gptq:
        args.methods = args.methods or default_rows(16)
        args.methods += [m for m in ("rtn", *gptq_rows()) if m not in args.methods]
    logging.basicConfig(level=logging.WARNING)

    import torch

    import qig
    from qig.calib import calibration_for
    from qig.embedded import world
    from qig.evaluate import ReferenceOutputs, eval_split, evaluate_records, reference_outputs
    from qig.fileio import atomic_write_bytes
    from qig.loading import load_model_and_processor
    from qig.quant.activation import remove_activation_quantizers
    from qig.runs import CONFIG_KEY

    seeds = args.eval_seeds or [world.DEFAULT_EVAL_SEED]
    dtypes = list(dict.fromkeys(args.dtype))
    models = {d: load_model_and_processor(args.model, dtype=getattr(torch, d)) for d in dtypes}
    fp_states = {d: {k: v.clone() for k, v in m.state_dict().items()} for d, (m, _) in models.items()}
    model, processor = models[dtypes[0]]
    calib = calibration_for(
        model, processor, args.calib, image_folder=args.image_folder, n_samples=args.n_samples, seed=args.calib_seed
    )

    def label(setting: str, dtype: str) -> str:
        """A setting's key in the tables: the setting alone for the default float32 run, else with its dtype."""
        return setting if dtypes == ["float32"] else f"{setting} {dtype}"

    cached: dict[int, ReferenceOutputs] = {}

    def references(seed: int) -> ReferenceOutputs:
        """The FP model's answers and log-probs on a seed's questions, computed once for every row."""
        if seed not in cached:
            fp_model, fp_proc = load_model_and_processor(args.model, args.device)
            cached[seed] = reference_outputs(fp_model, fp_proc, eval_split(seed, args.limit))
        return cached[seed]

    def score(folder: str, seed: int, dtype: str, ref: ReferenceOutputs | None) -> dict:
        """``qig eval``'s report of a saved row, the model reloaded in ``dtype`` (float32: as ``run_eval``)."""
        scored, scored_proc = load_model_and_processor(folder, args.device, dtype=getattr(torch, dtype))
        return evaluate_records(scored, scored_proc, eval_split(seed, args.limit), reference=ref)

    results: dict[str, dict[str, dict[int, float]]] = {}
    fidelity: dict[str, dict[str, dict[int, dict]]] = {}
    correct: dict[str, dict[str, dict[int, list[int]]]] = {}  # per question: 1 if right
    shares: dict[str, dict[str, dict[str, float]]] = {}

    def save() -> None:
        """``--json``: every row scored so far (rewritten after each row, so a stopped run keeps its rows)."""
        if not args.json:
            return
        out = {"eval_seeds": seeds, "limit": args.limit, "n_samples": args.n_samples, "dtypes": dtypes}
        out |= {"model": args.model, "calib_seed": args.calib_seed}
        out |= {"results": results, "fidelity": fidelity, "token_weight_shares": shares, "correct": correct}
        atomic_write_bytes(args.json, json.dumps(out, indent=1).encode())

    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            wbits, group, abits = parse_setting(setting)
            scheme = scheme_of(setting)
            for method in args.methods or default_rows(abits):
                if not applies(method, abits, scheme):
                    print(f"{setting} {method}: not a row of this setting, skipped", file=sys.stderr)
                    continue
                for dtype in dtypes:
                    key = label(setting, dtype)
                    scored_fp = [k for k, r in results.items() if k.endswith(key.removeprefix(setting)) and "fp" in r]
                    if method == "fp" and scored_fp:  # FP in this dtype does not depend on the setting
                        results.setdefault(key, {})["fp"] = results[scored_fp[0]]["fp"]
                        correct.setdefault(key, {})["fp"] = correct[scored_fp[0]]["fp"]
                        continue
                    model, processor = models[dtype]
                    remove_activation_quantizers(model)  # the previous row's W-A model
                    if hasattr(model.config, CONFIG_KEY):
                        delattr(model.config, CONFIG_KEY)  # the FP row saves a plain FP config
                    model.load_state_dict(fp_states[dtype])
                    t = time.perf_counter()
                    if method != "fp":
                        config = make_row_config(method, wbits, group, args.qig_steps, abits, scheme)
                        result = qig.quantize(model, config, calib, device=args.device, progress=False)
                        if share := role_shares(result):
                            shares.setdefault(key, {})[method] = share
                    seconds = time.perf_counter() - t
                    folder = os.path.join(tmp, f"{key}-{re.sub(r'[^a-z0-9+.=-]', '_', method)}".replace(" ", "-"))
                    model.save_pretrained(folder)
                    processor.save_pretrained(folder)
                    accs = {}
                    for seed in seeds:
                        ref = references(seed) if args.fidelity and method != "fp" else None
                        rep = score(folder, seed, dtype, ref)
                        if ref is not None:
                            fidelity.setdefault(key, {}).setdefault(method, {})[seed] = rep["fidelity"]
                        accs[seed] = rep["accuracy"]
                        correct.setdefault(key, {}).setdefault(method, {})[seed] = [
                            r["correct"] for r in rep["predictions"]
                        ]
                    results.setdefault(key, {})[method] = accs
                    print(
                        f"{key} {method:<8} quantize {seconds:6.1f}s  "
                        + "  ".join(f"seed {s}: {100 * a:.1f}%" for s, a in accs.items()),
                        file=sys.stderr,
                        flush=True,
                    )
                    del accs
                    save()
                torch.manual_seed(0)
    print(format_table(results, seeds))
    print()
    print(format_paired(correct, seeds))
    if fidelity:
        print()
        print(format_fidelity(fidelity, shares, seeds))
    if len(seeds) > 1:
        print()
        print(format_pooled(correct, fidelity, seeds))
    if len(dtypes) > 1:
        print()
        print(format_dtypes(correct, args.settings, dtypes, seeds))
    save()
    return 0


def print_saved(files: list[str]) -> int:
    """The tables of several ``--json`` files, merged: rows of separate runs on the same seeds and questions."""
    correct: dict = {}
    results: dict = {}
    seeds, limit = None, None
    for name in files:
        with open(name) as f:
            saved = json.load(f)
        if seeds is not None and (saved["eval_seeds"], saved["limit"]) != (seeds, limit):
            raise SystemExit(f"{name}: other eval seeds or question count than {files[0]}; its rows cannot be paired")
        seeds, limit = saved["eval_seeds"], saved["limit"]
        for setting, rows in saved["correct"].items():
            for row, per_seed in rows.items():
                answers = {int(k): v for k, v in per_seed.items()}
                if correct.get(setting, {}).get(row, answers) != answers:  # a row both runs made (fp) must agree
                    raise SystemExit(f"{name}: {setting} {row} answered otherwise than in an earlier file")
                correct.setdefault(setting, {})[row] = answers
                results.setdefault(setting, {})[row] = {int(k): v for k, v in saved["results"][setting][row].items()}
    print(format_table(results, seeds))
    print()
    print(format_paired(correct, seeds))
    if len(seeds) > 1:
        print()
        print(format_pooled(correct, {}, seeds))
    return 0


def format_dtypes(correct: dict, settings: list[str], dtypes: list[str], seeds: list[int]) -> str:
    """Per setting and row: accuracy in each dtype per seed, and each dtype's paired difference to the first."""
    base, others = dtypes[0], dtypes[1:]
    lines = [f"accuracy per dtype; difference to {base} on the same questions (points, +- one standard error):"]
    for setting in settings:
        rows = {d: correct.get(f"{setting} {d}", {}) for d in dtypes}
        methods = [m for m in rows[base] if all(m in rows[d] for d in others)]
        if not methods:
            continue
        width = max(len(m) for m in methods)
        head = [f"{d} s{s}" for s in seeds for d in dtypes] + [f"{d} - {base} s{s}" for s in seeds for d in others]
        widths = [max(len(h), 12) for h in head]
        lines.append(f"{setting:<{width}} " + " ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
        worst = (0.0, "")
        for m in methods:
            cells = [f"{100 * sum(rows[d][m][s]) / len(rows[d][m][s]):.1f}%" for s in seeds for d in dtypes]
            for s in seeds:
                for d in others:
                    diff, se = paired_difference(rows[d][m][s], rows[base][m][s])
                    cells.append(f"{diff:+.1f} +- {se:.1f}")
                    worst = max(worst, (abs(diff), f"{m} {d} seed {s}"))
            lines.append(f"{m:<{width}} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
        ok = "yes" if worst[0] <= DTYPE_GAP else "NO"
        where = f", {worst[1]}" if worst[0] > 0 else ""
        lines.append(
            f"{setting}: every row within {DTYPE_GAP} points of {base} in {', '.join(others)}: {ok} "
            f"(largest |difference| {worst[0]:.1f}{where})"
        )
    return "\n".join(lines)


def role_shares(result) -> dict[str, float]:
    """Mean over searched groups of the share of the token weights per role (vision, prompt, answer)."""
    stats = [g.weight_stats for g in result.groups if g.weight_stats]
    keys = sorted({k for st in stats for k in st if k.startswith("mass_")})
    return {k.removeprefix("mass_"): sum(st.get(k, 0.0) for st in stats) / len(stats) for k in keys}


def format_fidelity(fidelity: dict, shares: dict, seeds: list[int]) -> str:
    """Agreement with FP and mean KL to FP per row and seed, then the token-weight shares of each row."""
    lines = []
    for setting, rows in fidelity.items():
        lines.append(f"{setting}: agreement with FP / mean KL to FP")
        width = max(len(m) for m in rows)
        lines.append(f"{'method':<{width}} " + " ".join(f"{'seed ' + str(s):>22}" for s in seeds))
        for m, per_seed in rows.items():
            cells = [f"{100 * per_seed[s]['agreement']:>8.1f}% / {per_seed[s]['kl']:.5f}" for s in seeds]
            lines.append(f"{m:<{width}} " + " ".join(f"{c:>22}" for c in cells))
        for m, share in shares.get(setting, {}).items():
            lines.append(f"{setting} {m}: token-weight share " + ", ".join(f"{k} {v:.3f}" for k, v in share.items()))
    return "\n".join(lines)


PAIRS = [
    ("qig", "mbq"),
    ("mbq", "smoothquant"),
    ("mbq", "rtn"),
    ("awq", "rtn"),
    ("qig", "awq"),
    ("mbq", "awq"),
    ("gptq", "rtn"),
    ("gptq+qig", "gptq"),
]


def paired_difference(a: list[int], b: list[int]) -> tuple[float, float]:
    """Accuracy difference a - b on the same questions and its standard error (points)."""
    import statistics

    d = [x - y for x, y in zip(a, b, strict=True)]
    return 100 * sum(d) / len(d), 100 * statistics.pstdev(d) / len(d) ** 0.5


def compared_pairs(rows: dict) -> list[tuple[str, str]]:
    """The orderings the issues ask about, and each ablation row against its plain row, where both ran."""
    variants = [(r, split_row(r)[0]) for r in rows if "[" in r]
    return [(a, b) for a, b in PAIRS + variants if a in rows and b in rows]


def recovered_share(method: list[int], rtn: list[int], fp: list[int]) -> tuple[float, float]:
    """Share of RTN's loss a row wins back, sum(method - rtn) / sum(fp - rtn), and its standard error.

    Per question a = method - rtn and b = fp - rtn (paired); the ratio's standard error by the delta
    method, sqrt(var(a - R b) / n) / mean(b).
    """
    import statistics

    a = [m - r for m, r in zip(method, rtn, strict=True)]
    b = [f - r for f, r in zip(fp, rtn, strict=True)]
    if sum(b) == 0:
        return float("nan"), float("nan")
    share = sum(a) / sum(b)
    resid = [x - share * y for x, y in zip(a, b, strict=True)]
    return share, statistics.pstdev(resid) / len(resid) ** 0.5 / (sum(b) / len(b))


def format_pooled(correct: dict, fidelity: dict, seeds: list[int]) -> str:
    """Over all eval seeds: RTN's loss, the share of it each row recovers, and the pairs' differences.

    Accuracy: every question of every seed pooled (paired, so the SE is the paired one). KL: the mean
    of the per-seed differences of the mean KL, with the standard error of that mean over seeds.
    """
    import statistics

    def pooled(per_seed: dict) -> list[int]:
        return [x for s in seeds for x in per_seed[s]]

    n = len(seeds)
    head = "accuracy: questions pooled, paired SE; KL: per-seed differences, SE over seeds"
    lines = [f"over all {n} eval seeds ({head}):"]
    for setting, rows in correct.items():
        base = baseline_row(rows)
        if FP_ROW in rows and base is not None:
            fp, rtn = pooled(rows[FP_ROW]), pooled(rows[base])
            loss, se = paired_difference(fp, rtn)
            lines.append(f"{setting}: {baseline_name(base)} loses {loss:.1f} +- {se:.1f} points to FP")
            for m in rows:
                if m not in (FP_ROW, base):
                    share, share_se = recovered_share(pooled(rows[m]), rtn, fp)
                    lines.append(f"{setting} {m}: recovers {100 * share:.1f}% +- {100 * share_se:.1f}% of it")
        kl = fidelity.get(setting, {})
        for a, b in compared_pairs(rows):
            d, se = paired_difference(pooled(rows[a]), pooled(rows[b]))
            text = f"{setting} {a} - {b}: accuracy {d:+.2f} +- {se:.2f}"
            if a in kl and b in kl and n > 1:
                diffs = [kl[a][s]["kl"] - kl[b][s]["kl"] for s in seeds]
                rel = statistics.mean(diffs) / statistics.mean(kl[b][s]["kl"] for s in seeds)
                text += (
                    f"; KL {statistics.mean(diffs):+.5f} +- {statistics.stdev(diffs) / n**0.5:.5f} "
                    f"({100 * rel:+.0f}%), lower on {sum(x < 0 for x in diffs)} of {n} seeds"
                )
            lines.append(text)
    return "\n".join(lines)


def format_paired(correct: dict, seeds: list[int]) -> str:
    """Paired differences for the orderings the issues ask about: same questions, so noise is the SE shown."""
    lines = ["paired accuracy differences on the same questions (points, +- one standard error):"]
    for setting, rows in correct.items():
        for a, b in compared_pairs(rows):
            cells = [(s, *paired_difference(rows[a][s], rows[b][s])) for s in seeds]
            text = "  ".join(f"seed {s} {d:+.1f} +- {se:.1f}" for s, d, se in cells)
            lines.append(f"{setting} {a} - {b}: {text}")
    return "\n".join(lines)


def format_table(results: dict, seeds: list[int]) -> str:
    cols = [(setting, s) for setting in results for s in seeds]
    methods = list(dict.fromkeys(m for r in results.values() for m in r))  # row order as run
    width = max(len(m) for m in methods)
    head = f"{'method':<{width}} " + " ".join(f"{setting + ' s' + str(s):>16}" for setting, s in cols)
    lines = [head]
    for m in methods:
        cells = []
        for setting, s in cols:
            a = results[setting].get(m, {}).get(s)
            cells.append(f"{'':>16}" if a is None else f"{100 * a:>15.1f}%")
        lines.append(f"{m:<{width}} " + " ".join(cells))
    for setting in results:
        r = results[setting]
        if {"rtn", "mbq", "qig"} <= set(r) and "smoothquant" in r:
            for s in seeds:
                lines.append(
                    f"{setting} seed {s}: QIG >= MBQ {'yes' if r['qig'][s] >= r['mbq'][s] else 'NO'}, "
                    f"MBQ >= SmoothQuant {'yes' if r['mbq'][s] >= r['smoothquant'][s] else 'NO'}, "
                    f"MBQ >= RTN {'yes' if r['mbq'][s] >= r['rtn'][s] else 'NO'}"
                )
        if "fp" in r and setting.lower().startswith("w8a8"):
            for s in seeds:
                worst = min((a[s], m) for m, a in r.items() if m != "fp")
                gap = 100 * (r["fp"][s] - worst[0])
                lines.append(
                    f"{setting} seed {s}: every method within 1 point of FP {'yes' if gap <= 1 else 'NO'} "
                    f"(largest drop {gap:.1f}, {worst[1]})"
                )
        if {"rtn", "awq", "qig"} <= set(r):
            for s in seeds:
                lines.append(
                    f"{setting} seed {s}: AWQ > RTN {'yes' if r['awq'][s] > r['rtn'][s] else 'NO'}, "
                    f"QIG >= AWQ {'yes' if r['qig'][s] >= r['awq'][s] else 'NO'}"
                )
        if {"rtn", "gptq", "gptq+qig"} <= set(r):
            for s in seeds:
                lines.append(
                    f"{setting} seed {s}: GPTQ > RTN {'yes' if r['gptq'][s] > r['rtn'][s] else 'NO'}, "
                    f"GPTQ+QIG >= GPTQ {'yes' if r['gptq+qig'][s] >= r['gptq'][s] else 'NO'}"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
