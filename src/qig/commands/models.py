"""``qig models``: the supported model families, what qig does with each, and the classes they match.

    qig models
    qig models --json

Every family runs every method of ``qig quantize`` through the same layer-wise
pipeline, weight-only (WxA16) and weight-activation modes (``--abits``). A
model no entry matches but whose decoder layers follow the Llama naming
convention is handled by the fallback; anything else is refused with this
listing.
"""

from __future__ import annotations

import argparse
import json

MODES = ("W-only", "W-A")


def register(p: argparse.ArgumentParser) -> None:
    """Flags of ``qig models`` on ``p`` (the subparser ``qig.cli`` made for it)."""
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    p.set_defaults(func=run)


def listing() -> list[dict]:
    """One row per family: name, classes, model types, modes, notes (every family runs every method)."""
    from qig.models import FAMILIES
    from qig.models.families import _FALLBACK_LAYER_PATHS

    modes = list(MODES)
    rows = [
        {
            "family": fam.name,
            "classes": list(fam.classes),
            "model_types": list(fam.model_types),
            "modes": modes,
            "remote_code": fam.remote_code,
            "note": fam.note,
        }
        for fam in FAMILIES
    ]
    rows.append(
        {
            "family": "llama-names (fallback)",
            "classes": ["any model with Llama-named decoder layers"],
            "model_types": [],
            "modes": modes,
            "remote_code": False,
            "note": "layers at " + ", ".join(_FALLBACK_LAYER_PATHS),
        }
    )
    return rows


def run(args) -> int:
    from qig.models.families import HOW_TO_ADD

    rows = listing()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["family"]) for r in rows)
    for r in rows:
        remote = " [--trust-remote-code]" if r["remote_code"] else ""
        print(f"{r['family']:<{width}}  {', '.join(r['classes'])}{remote}")
        print(f"{'':<{width}}  modes: {', '.join(r['modes'])}")
        if r["note"]:
            print(f"{'':<{width}}  {r['note']}")
    print(f"\nEvery family runs every method of qig quantize (qig quantize --help lists them), {' and '.join(MODES)}.")
    print(f"Other models are refused; {HOW_TO_ADD}.")
    return 0
