"""The table of scripts/check_vllm.sh --families: vLLM's greedy tokens against transformers' on every family folder.

Runs in the project venv. Reads the check's ``families.tsv`` (one tab-separated
line per folder: family, setting, folder, the expected vLLM scheme/kernel of
the decoder linears or ``-`` for unquantized) and per line ``NAME.vllm.json``
and ``NAME.hf.json`` (scripts/vllm_tokens.py; NAME = family-setting). Prints
one line per folder, ``ok`` or the reason, then a markdown table. A row holds
when vLLM loaded the folder and generated, every decoder linear got the
expected scheme and kernel and nothing else is quantized, both engines saw
the same number of prompt tokens, and the first generated token agrees on at
least ``--min-first`` of the prompts. The share of prompts whose every token
agrees is reported, not required (after a first difference the two
continuations are different prompts). Exit status 1 when a row fails.

    .venv/bin/python scripts/vllm_family_table.py --dir out/check-vllm-families
"""

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

KEPT = {"UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"}  # the second: lm_head, a ParallelLMHead in vLLM
DECODER = re.compile(r"(language_model|text_model)(\.model)?\.layers\.\d+\.")  # vLLM's decoder-layer names


def _short(kernel: str) -> str:
    return kernel.replace("CompressedTensors", "CT").replace("LinearKernel", "").replace("LinearMethod", "")


def _reason(error: str) -> str:
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    reason = lines[0] if len(lines) == 1 else f"{lines[0]} / {lines[-1]}"
    return reason if len(reason) <= 300 else reason[:297] + "..."


def row(family: str, setting: str, folder: str, expect: str, work: Path, min_first: float) -> dict:
    name = f"{family}-{setting}"
    out = {"family": family, "setting": setting, "folder": folder, "ok": False}
    files = {engine: work / f"{name}.{engine}.json" for engine in ("vllm", "hf")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        out["note"] = f"not run ({', '.join(missing)} missing: see the check's log)"
        return out
    served, ours = (json.loads(f.read_text()) for f in files.values())
    if "error" in served:
        out["note"] = "vLLM refused: " + _reason(served["error"])
        return out
    if "error" in ours:
        out["note"] = "transformers failed: " + _reason(ours["error"])
        return out
    layers = served["layers"]
    decoder = Counter(v for k, v in layers.items() if DECODER.search(k))
    others = Counter(v for k, v in layers.items() if not DECODER.search(k))
    out["kernels"] = ", ".join(f"{_short(k)} x{n}" for k, n in decoder.items())
    out["kept"] = ", ".join(f"{_short(k)} x{n}" for k, n in others.items())
    a, b = served["tokens"], ours["tokens"]
    n = len(b)
    out["n"] = n
    out["first"] = sum(x[:1] == y[:1] for x, y in zip(a, b, strict=True)) / n
    out["all"] = sum(x == y for x, y in zip(a, b, strict=True)) / n
    out["distinct_first"] = len({tuple(y[:1]) for y in b})
    out["same_prompt_tokens"] = served["prompt_tokens"] == ours["prompt_tokens"]
    margins = [m for (x, y, m) in zip(a, b, ours["first_margin"], strict=True) if x[:1] != y[:1]]
    out["disagreeing_margins"] = margins  # transformers' log-probability gap of its top two, where they differ
    out["seconds"] = {"vllm": served["seconds"], "transformers": ours["seconds"]}
    problems = []
    want = "UnquantizedLinearMethod" if expect == "-" else expect
    if set(decoder) != {want}:
        problems.append(f"decoder linears got {dict(decoder)}, expected {want}")
    if not set(others) <= KEPT:
        problems.append(f"linears outside the decoder got {dict(others)}, expected {sorted(KEPT)} only")
    if not out["same_prompt_tokens"]:
        pairs = zip(served["prompt_tokens"], ours["prompt_tokens"], strict=True)
        diff = next(i for i, (x, y) in enumerate(pairs) if x != y)
        problems.append(
            f"prompt lengths differ (prompt {diff}: vLLM {served['prompt_tokens'][diff]}, "
            f"transformers {ours['prompt_tokens'][diff]} tokens)"
        )
    if out["first"] < min_first:
        problems.append(f"first-token agreement {out['first']:.1%} < {min_first:.0%}")
    out["note"] = "; ".join(problems)
    out["ok"] = not problems
    first_try = work / f"{name}.hf-project-venv.json"
    if first_try.is_file():  # the check fell back to the vLLM venv's transformers for the reference side
        runtime = ", ".join(f"{k} {v}" for k, v in ours.get("runtime", {}).items())
        failed = _reason(json.loads(first_try.read_text()).get("error", "?"))
        out["reference"] = f"reference run with {runtime} (the vLLM venv's): the project venv's failed: {failed}"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="the check's work folder (holds families.tsv)")
    parser.add_argument("--min-first", type=float, default=0.95)
    args = parser.parse_args()
    work = Path(args.dir)
    rows = []
    for line in (work / "families.tsv").read_text().splitlines():
        family, setting, folder, expect = line.split("\t")
        rows.append(row(family, setting, folder, expect, work, args.min_first))
    for r in rows:
        status = "ok" if r["ok"] else f"FAILED: {r['note']}"
        if "reference" in r:
            status += f" [{r['reference']}]"
        if "first" in r:
            status += (
                f"  (first token {r['first']:.1%}, all tokens {r['all']:.1%} of {r['n']}; "
                f"{r['distinct_first']} distinct first tokens)"
            )
        print(f"{r['family']:16s} {r['setting']:12s} {status}")
    print()
    print(
        "| family | folder | vLLM scheme / kernel (decoder linears) | kept in FP by vLLM | first token | all tokens "
        "| distinct first | result |"
    )
    print("| --- | --- | --- | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        if "first" not in r:
            print(f"| {r['family']} | {r['setting']} | | | | | | {r['note']} |")
            continue
        k = round(r["first"] * r["n"])
        m = round(r["all"] * r["n"])
        result = "ok" if r["ok"] else r["note"]
        if "reference" in r:
            result += f"; {r['reference']}"
        print(
            f"| {r['family']} | {r['setting']} | {r['kernels']} | {r['kept']} | {r['first']:.1%} ({k}/{r['n']}) "
            f"| {r['all']:.1%} ({m}/{r['n']}) | {r['distinct_first']} | {result} |"
        )
    (work / "families.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
