"""The ranking of issue 30: AWQ, MBQ and QIG with and without the clipping search and duo scaling, QIG over
all tokens or vision + answer, GPTQ rows, on the three embedded testbeds (not a test).

    python benchmarks/ranking.py --testbeds vsinks --eval-seeds 1 2 --limit 1000       # run, then report
    python benchmarks/ranking.py --testbeds sinks --settings w2channel --rows fp rtn awq mbq qig
    python benchmarks/ranking.py --testbeds sinks --settings w2g128 --rows fp rtn awq mbq qig --part a &
    python benchmarks/ranking.py --testbeds sinks --settings w2g128 --rows "qig[weight_clip=true]" --part b
    python benchmarks/ranking.py --report-only                 # ranking.{json,md} from the runs kept so far

Each (testbed, setting, calibration draw) is one ``benchmarks/accuracy.py`` run with ``--fidelity``
(accuracy per question, agreement and KL to FP), kept as
``benchmarks/results/ranking/<testbed>-<setting>-calib<seed>.json`` (``...<seed>.<part>.json`` with ``--part``:
rows run side by side in separate processes, merged into one run by the report); runs of several invocations
(other testbeds, a second calibration draw with ``--calib-seed``) are merged into
``benchmarks/results/ranking.json`` and ``ranking.md``. Per setting the report gives RTN's loss to FP,
per row the pooled accuracy over every eval seed's questions, the share of RTN's loss it recovers
(delta-method SE), its paired difference to plain QIG (SE from the same questions) and its mean KL to FP;
then, per QIG recipe, its paired differences to AWQ and MBQ (plain, and with the same lever), marked
``WIN`` beyond +2 SE and ``LOSS`` below -1 SE, the rule of the issue's point 5.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import accuracy  # noqa: E402  (benchmarks/, the script's own folder)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNS = HERE / "results" / "ranking"
TESTBEDS = {  # name -> (model folder or None for the default, its settings)
    "default": (None, ["w3g128", "w4a8", "nvfp4"]),
    "sinks": ("src/qig/assets/tiny-lvlm-sinks", ["w2channel", "w2g128"]),
    "vsinks": ("src/qig/assets/tiny-lvlm-vsinks", ["w2channel", "nvfp4"]),
}
SEARCHES = ("awq", "mbq", "qig")
LEVERS = {"clip": "weight_clip=true", "duo": "duo_scaling=true", "clip+duo": "weight_clip=true,duo_scaling=true"}
VA = "qig[tokens=vision+answer]"
GPTQ_ROWS = ("gptq", "gptq+qig", "awq+gptq", "mbq+gptq", "qig+gptq")


def default_rows(abits: int, scheme: str | None = None) -> list[str]:
    """fp, the baseline (RTN, or where it does not exist RTN with calibrated activation scales), each search plain
    and with each lever, QIG over vision + answer, and (weight-only) the GPTQ rows."""
    base = next(b for b in accuracy.BASELINES if accuracy.applies(b, abits, scheme))
    rows = ["fp", base, *SEARCHES]
    rows += [f"{m}[{LEVERS[k]}]" for k in ("clip", "duo") for m in SEARCHES]
    rows += [VA]
    return rows + (list(GPTQ_ROWS) if abits == 16 else [])


def run_file(testbed: str, setting: str, calib_seed: int | None, part: str | None = None) -> Path:
    """``<testbed>-<setting>-calib<seed>[.<part>].json``: the parts of one run are merged by the report."""
    stem = f"{testbed}-{setting}-calib{'default' if calib_seed is None else calib_seed}"
    return RUNS / f"{stem}{'' if part is None else '.' + part}.json"


def merge(paths: list[Path]) -> dict:
    """The parts of one run (rows run in separate processes on the same questions and calibration set), merged.

    Every part must have the same eval seeds, questions, calibration draw and model; a row two parts made
    (fp, rtn) must have answered every question alike.
    """
    merged: dict = {}
    same = ("eval_seeds", "limit", "n_samples", "calib_seed", "model")
    for path in paths:
        data = json.loads(path.read_text())
        if not merged:
            merged = {k: data[k] for k in same} | {"correct": {}, "fidelity": {}, "token_weight_shares": {}}
        elif any(data[k] != merged[k] for k in same):
            raise SystemExit(f"{path}: other {', '.join(same)} than {paths[0]}; its rows cannot be paired")
        for table in ("correct", "fidelity", "token_weight_shares"):
            for setting, rows in data.get(table, {}).items():
                kept = merged[table].setdefault(setting, {})
                for row, value in rows.items():
                    if table == "correct" and kept.get(row, value) != value:
                        raise SystemExit(f"{path}: {setting} {row} answered otherwise than in another part")
                    kept[row] = value
    return merged


def run(args) -> None:
    """One accuracy.py run per (testbed, setting), each kept in RUNS."""
    RUNS.mkdir(parents=True, exist_ok=True)
    for testbed in args.testbeds:
        model, settings = TESTBEDS[testbed]
        for setting in args.settings or settings:
            abits = accuracy.parse_setting(setting)[2]
            rows = args.rows or default_rows(abits, accuracy.scheme_of(setting))
            argv = ["--settings", setting, "--methods", *rows, "--fidelity", "--limit", str(args.limit)]
            argv += ["--eval-seeds", *map(str, args.eval_seeds), "--n-samples", str(args.n_samples)]
            argv += ["--json", str(run_file(testbed, setting, args.calib_seed, args.part))]
            argv += ["--model", str(ROOT / model)] if model else []
            argv += ["--calib-seed", str(args.calib_seed)] if args.calib_seed is not None else []
            print(f"== {testbed} {setting}: accuracy.py {' '.join(argv)}", file=sys.stderr, flush=True)
            accuracy.main(argv)


def _pooled(per_seed: dict, seeds: list) -> list[int]:
    return [x for s in seeds for x in per_seed[str(s)]]


def summarise(data: dict, testbed: str) -> dict:
    """One kept run: per row its pooled accuracy, share of the baseline's loss recovered, difference to QIG, KL."""
    ((setting, rows),) = data["correct"].items()
    seeds = data["eval_seeds"]
    base = accuracy.baseline_row(rows)
    fp, rtn = _pooled(rows["fp"], seeds), _pooled(rows[base], seeds)
    loss, loss_se = accuracy.paired_difference(fp, rtn)
    kl = data.get("fidelity", {}).get(setting, {})
    out = {"testbed": testbed, "setting": setting, "model": data.get("model"), "calib_seed": data.get("calib_seed")}
    out |= {"eval_seeds": seeds, "questions_per_seed": data["limit"], "n_samples": data["n_samples"]}
    out |= {"baseline": base, "rtn_loss": loss, "rtn_loss_se": loss_se, "rows": {}}
    qig = _pooled(rows["qig"], seeds) if "qig" in rows else None
    for row, per_seed in rows.items():
        acc = _pooled(per_seed, seeds)
        entry = {"accuracy": 100 * sum(acc) / len(acc)}
        if row not in ("fp", base):
            share, share_se = accuracy.recovered_share(acc, rtn, fp)
            entry |= {"recovered": 100 * share, "recovered_se": 100 * share_se}
        if qig is not None and row != "qig":
            entry["minus_qig"], entry["minus_qig_se"] = accuracy.paired_difference(acc, qig)
        if row in kl:
            entry["kl"] = statistics.mean(kl[row][str(s)]["kl"] for s in seeds)
        out["rows"][row] = entry
    out["verdicts"] = verdicts(rows, seeds)
    return out


def rivals(row: str) -> list[str]:
    """What a QIG recipe is ranked against: AWQ's and MBQ's defaults, and each with the recipe's lever.

    ``qig[<lever>]`` -> awq, mbq, awq[<lever>], mbq[<lever>]; ``qig+gptq`` (the search, then GPTQ) -> awq, mbq,
    awq+gptq, mbq+gptq; ``gptq+qig`` (GPTQ's Hessian weighted by QIG) -> gptq (every token weighs 1) and
    gptq+mbq. Not a QIG recipe: no rivals.
    """
    if row.startswith("gptq+qig"):
        return ["gptq", "gptq+mbq"]
    if not row.startswith("qig"):
        return []
    if row.endswith("+gptq"):
        return ["awq", "mbq", "awq+gptq", "mbq+gptq"]
    opts = row.partition("[")[2].rstrip("]")
    lever = next((v for v in LEVERS.values() if v == opts), None)
    return ["awq", "mbq"] + ([f"awq[{lever}]", f"mbq[{lever}]"] if lever else [])


def verdicts(rows: dict, seeds: list) -> list[dict]:
    """Every QIG recipe against its rivals (:func:`rivals`) that ran: paired difference, SE, verdict."""
    out = []
    for row in rows:
        for rival in (r for r in rivals(row) if r in rows):
            d, se = accuracy.paired_difference(_pooled(rows[row], seeds), _pooled(rows[rival], seeds))
            verdict = "WIN" if d > 2 * se else "LOSS" if d < -se else "tie"
            out.append({"recipe": row, "rival": rival, "diff": d, "se": se, "verdict": verdict})
    return out


def borrow_calibration_free_rows(data: dict, donors: list[dict]) -> None:
    """A run without fp or rtn takes them from another run of the same model on the same questions.

    FP is the model itself: it answers alike in every setting and calibration draw. RTN rounds the weights
    alone: it answers alike in every calibration draw of its setting. ``data["borrowed"]`` names the rows taken.
    """
    ((setting, rows),) = data["correct"].items()
    for row in ("fp", "rtn"):
        for donor in donors:
            if row in rows or donor is data or any(data[k] != donor[k] for k in ("eval_seeds", "limit", "model")):
                continue
            ((donor_setting, donor_rows),) = donor["correct"].items()
            if row not in donor_rows or (row == "rtn" and donor_setting != setting):
                continue
            for table in ("correct", "fidelity"):
                if row in donor[table].get(donor_setting, {}):
                    data[table].setdefault(setting, {})[row] = donor[table][donor_setting][row]
            data.setdefault("borrowed", []).append(row)
    first = ("fp", *accuracy.BASELINES)
    for table in ("correct", "fidelity"):
        if setting in data[table]:
            data[table][setting] = dict(sorted(data[table][setting].items(), key=lambda kv: kv[0] not in first))


def report() -> dict:
    """Every kept run summarised, ranking.json and ranking.md written."""
    parts: dict[str, list[Path]] = {}
    for path in sorted(RUNS.glob("*.json")):
        parts.setdefault(path.name.split(".")[0], []).append(path)
    merged = {stem: merge(paths) for stem, paths in parts.items()}
    runs = []
    for stem, data in merged.items():
        borrow_calibration_free_rows(data, list(merged.values()))
        if not all("fp" in rows and accuracy.baseline_row(rows) for rows in data["correct"].values()):
            print(f"{stem}: no fp or baseline row yet (a run under way), left out", file=sys.stderr)
            continue
        runs.append(summarise(data, stem.split("-", 1)[0]) | {"borrowed": data.get("borrowed", [])})
    (HERE / "results" / "ranking.json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    (HERE / "results" / "ranking.md").write_text(markdown(runs))
    return {"runs": runs}


def markdown(runs: list[dict]) -> str:
    lines = ["# Ranking (issue 30): `python benchmarks/ranking.py`", ""]
    for r in runs:
        seeds = ", ".join(map(str, r["eval_seeds"]))
        lines += [
            f"## {r['testbed']} {r['setting']} (calibration draw {r['calib_seed'] or 'default'})",
            "",
            f"{r['n_samples']} calibration samples; eval seeds {seeds}, {r['questions_per_seed']} questions each, "
            f"pooled. {accuracy.baseline_name(r['baseline'])} loses {r['rtn_loss']:.1f} "
            f"+- {r['rtn_loss_se']:.1f} points to FP."
            + (
                f" The rows {', '.join(r['borrowed'])}, which read no calibration data, are another run's on the "
                "same model and questions (fp: any setting; rtn: the same setting, another draw)."
                if r.get("borrowed")
                else ""
            ),
            "",
            "| row | accuracy | recovers of the baseline's loss | - qig (paired) | KL to FP |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for row, e in r["rows"].items():
            rec = f"{e['recovered']:.1f}% +- {e['recovered_se']:.1f}" if "recovered" in e else ""
            dq = f"{e['minus_qig']:+.2f} +- {e['minus_qig_se']:.2f}" if "minus_qig" in e else ""
            kl = f"{e['kl']:.4f}" if "kl" in e else ""
            lines.append(f"| `{row}` | {e['accuracy']:.2f} | {rec} | {dq} | {kl} |")
        lines += ["", "| QIG recipe | rival | difference (points) | verdict |", "| --- | --- | ---: | --- |"]
        for v in r["verdicts"]:
            lines.append(f"| `{v['recipe']}` | `{v['rival']}` | {v['diff']:+.2f} +- {v['se']:.2f} | {v['verdict']} |")
        lines.append("")
    lines += [
        "WIN: ahead by more than 2 paired SE; LOSS: behind by more than 1 SE (issue 30, point 5); tie otherwise.",
        "",
        "## The default (issue 30, point 5): every QIG recipe's verdicts over the runs",
        "",
        "A recipe may become the default if it wins most and never loses beyond 1 SE; `not run` lists the runs "
        "(testbed setting draw) without it, where it was not measured.",
        "",
        "| QIG recipe | WIN | LOSS | tie | losses | not run |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for recipe, d in decide(runs).items():
        losses = "; ".join(d["losses"]) or "none"
        lines.append(
            f"| `{recipe}` | {d['WIN']} | {d['LOSS']} | {d['tie']} | {losses} | {', '.join(d['not_run']) or 'none'} |"
        )
    return "\n".join(lines + [""])


def decide(runs: list[dict]) -> dict[str, dict]:
    """Per QIG recipe: its verdicts counted over every run, where it lost, and the runs it is missing from."""
    name = {id(r): f"{r['testbed']} {r['setting']} {r['calib_seed'] or 'default'}" for r in runs}
    recipes = sorted({v["recipe"] for r in runs for v in r["verdicts"]}, key=lambda x: (x != "qig", x))
    out = {}
    for recipe in recipes:
        d: dict = {"WIN": 0, "LOSS": 0, "tie": 0, "losses": [], "not_run": []}
        for r in runs:
            if recipe not in r["rows"]:
                d["not_run"].append(name[id(r)])
            for v in (v for v in r["verdicts"] if v["recipe"] == recipe):
                d[v["verdict"]] += 1
                if v["verdict"] == "LOSS":
                    d["losses"].append(f"{name[id(r)]} vs `{v['rival']}` {v['diff']:+.2f} +- {v['se']:.2f}")
        out[recipe] = d
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbeds", nargs="+", choices=list(TESTBEDS), default=list(TESTBEDS))
    p.add_argument("--settings", nargs="+", default=None, help="instead of each testbed's own settings")
    p.add_argument("--rows", nargs="+", default=None, help="accuracy.py rows (default: ranking.default_rows)")
    p.add_argument("--eval-seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--limit", type=int, default=1000, help="questions per eval seed")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--calib-seed", type=int, default=None, help="a second calibration draw for the deciding rows")
    p.add_argument(
        "--part", default=None, help="keep this invocation's rows as a part of the run (rows side by side, merged)"
    )
    p.add_argument("--report-only", action="store_true", help="only merge the kept runs into ranking.{json,md}")
    args = p.parse_args(argv)
    if not args.report_only:
        run(args)
    print(markdown(report()["runs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
