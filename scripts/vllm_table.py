"""The table of scripts/check_vllm.sh: vLLM's answers against ``qig eval --json`` on the same folders.

Runs in the project venv. Reads the check's manifest (one tab-separated line
per served folder: name, folder, ``must`` or ``extra``, the expected vLLM
scheme/kernel of the decoder linears or ``-`` for none), and per folder
``NAME.vllm.json`` (scripts/vllm_answers.py) and ``NAME.qig.json`` (``qig eval
--json``). A ``must`` row passes when vLLM served it, every decoder linear got
the expected scheme and kernel and nothing else is quantized, and at least
``--min-agreement`` of the answers equal qig's. ``extra`` rows are reported,
never failed. Exit status 1 when a ``must`` row fails.

    .venv/bin/python scripts/vllm_table.py --dir out/check-vllm
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from qig.evaluate import normalize_answer

UNQUANTIZED = "UnquantizedLinearMethod"
KEPT = {UNQUANTIZED, "UnquantizedEmbeddingMethod"}  # the second: lm_head, a ParallelLMHead in vLLM


def _decoder(name: str) -> bool:
    """vLLM's name of a decoder linear (LLaVA: language_model.model.layers.N.*)."""
    return name.startswith("language_model.model.layers.")


def row(name: str, folder: str, kind: str, expect: str, work: Path, min_agreement: float) -> dict:
    served = json.loads((work / f"{name}.vllm.json").read_text())
    out = {"name": name, "folder": folder, "kind": kind, "ok": False}
    if "error" in served:
        lines = [line.strip() for line in served["error"].strip().splitlines() if line.strip()]
        reason = lines[0] if len(lines) == 1 else f"{lines[0]} / {lines[-1]}"
        out["note"] = "refused: " + (reason if len(reason) <= 240 else reason[:237] + "...")
        return out
    layers = served["layers"]
    decoder = Counter(v for k, v in layers.items() if _decoder(k))
    others = Counter(v for k, v in layers.items() if not _decoder(k))
    out["kernels"] = ", ".join(f"{k} x{n}" for k, n in decoder.items())
    out["kept"] = ", ".join(f"{k} x{n}" for k, n in others.items())
    ours = json.loads((work / f"{name}.qig.json").read_text())
    answers = [r["prediction"] for r in ours["predictions"]]
    gold = [r["answer"] for r in ours["predictions"]]
    vllm = served["answers"]
    same = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(vllm, answers, strict=True))
    out["agreement"] = same / len(answers)
    out["n"] = len(answers)
    out["acc_vllm"] = sum(normalize_answer(a) == normalize_answer(g) for a, g in zip(vllm, gold, strict=True)) / len(
        gold
    )
    out["acc_qig"] = ours["accuracy"]
    out["seconds"] = served["seconds"]
    problems = []
    want = UNQUANTIZED if expect == "-" else expect
    if set(decoder) != {want}:
        problems.append(f"decoder linears got {dict(decoder)}, expected {want}")
    if not set(others) <= KEPT:
        problems.append(f"linears outside the decoder got {dict(others)}, expected {sorted(KEPT)} only")
    if out["agreement"] < min_agreement:
        problems.append(f"agreement {out['agreement']:.1%} < {min_agreement:.0%}")
    out["note"] = "; ".join(problems)
    out["ok"] = not problems
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="the check's work folder (holds manifest.tsv)")
    parser.add_argument("--min-agreement", type=float, default=0.99)
    args = parser.parse_args()
    work = Path(args.dir)
    rows = []
    for line in (work / "manifest.tsv").read_text().splitlines():
        name, folder, kind, expect = line.split("\t")
        rows.append(row(name, folder, kind, expect, work, args.min_agreement))
    print("| setting | vLLM scheme / kernel (decoder linears) | kept in FP by vLLM | agreement | vLLM acc | qig acc |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        if "agreement" not in r:
            print(f"| {r['name']} | {r['note']} | | | | |")
            continue
        agree = f"{r['agreement']:.1%} ({round(r['agreement'] * r['n'])}/{r['n']})"
        print(f"| {r['name']} | {r['kernels']} | {r['kept']} | {agree} | {r['acc_vllm']:.1%} | {r['acc_qig']:.1%} |")
    failed = [r for r in rows if r["kind"] == "must" and not r["ok"]]
    for r in failed:
        print(f"FAILED {r['name']}: {r['note'] or 'not served'}", file=sys.stderr)
    (work / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
