"""Turn a trained checkpoint into the shipped embedded model, and measure it.

    python scripts/finalize_embedded.py --trained runs/tiny --out src/qig/assets/tiny-lvlm

1. Loads the trained checkpoint in float32.
2. Plants activation outlier channels with a function-preserving rescaling
   (``qig.embedded.plant_outlier_channels``; why: see its docstring and the
   model card) and checks that the logits did not change.
3. Saves it in float16 with its processor (atomically).
4. Measures what the model card reports: FP accuracy on the default eval
   seed and three others, accuracy with blank images, the per-type majority
   baseline, and plain RTN of every decoder linear at W4 g128, W3 g128,
   W2 g64; writes ``metrics.json`` and ``README.md`` (the model card).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

from qig import embedded, world
from qig.evaluate import evaluate_records, load_model_and_processor
from qig.quant import QuantSpec
from qig.quant.rtn import rtn_

RTN_SETTINGS = [("W4A16 g128", QuantSpec(4, 128)), ("W3A16 g128", QuantSpec(3, 128)), ("W2A16 g64", QuantSpec(2, 64))]


def calib_batch(processor, n: int = 64):
    recs = world.generate("calib", n, seed=world.DEFAULT_CALIB_SEED)
    texts = []
    for _, rec in recs:
        msgs = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": world.CAPTION_PROMPT}]},
            {"role": "assistant", "content": rec["conversations"][1]["value"]},
        ]
        texts.append(processor.apply_chat_template(msgs, tokenize=False))
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=[im for im, _ in recs], return_tensors="pt", padding=True)


def majority_baseline(records) -> float:
    """Accuracy of answering every question with its type's most frequent answer (no image, no question)."""
    by_type = defaultdict(list)
    for _, rec in records:
        by_type[rec["type"]].append(rec["conversations"][1]["value"])
    hits = sum(Counter(v).most_common(1)[0][1] for v in by_type.values())
    return hits / len(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trained", required=True)
    ap.add_argument("--out", default=str(embedded.default_model_dir()))
    ap.add_argument("--ratio", type=float, default=40.0, help="outlier channel magnitude / median channel")
    ap.add_argument("--n-hidden", type=int, default=4)
    ap.add_argument("--n-intermediate", type=int, default=8)
    ap.add_argument("--no-outliers", action="store_true", help="ship the trained weights unchanged")
    ap.add_argument("--n", type=int, default=1000, help="questions per eval seed")
    ap.add_argument("--seeds", default="1234,1,2,3")
    args = ap.parse_args()
    torch.set_num_threads(2)

    model, processor = load_model_and_processor(args.trained)
    batch = calib_batch(processor)
    with torch.no_grad():
        before = model(**batch).logits
    factors = {}
    if not args.no_outliers:
        factors = embedded.plant_outlier_channels(model, batch, args.n_hidden, args.n_intermediate, args.ratio)
    with torch.no_grad():
        after = model(**batch).logits
    rel = ((after - before).norm() / before.norm()).item()
    print(f"outlier planting: relative logit change {rel:.2e} (float32)")
    if rel > 1e-4:
        raise SystemExit(f"rescaling changed the function (relative {rel:.2e} > 1e-4)")

    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    model.to(torch.float16).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    log_src = Path(args.trained) / "training_log.json"
    if log_src.exists():
        shutil.copy(log_src, tmp / "training_log.json")
    (tmp / "outlier_factors.json").write_text(json.dumps(factors, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)

    seeds = [int(s) for s in args.seeds.split(",")]
    metrics = {"logit_change_from_outlier_planting": rel, "outliers": not args.no_outliers, "ratio": args.ratio}
    fp, _ = load_model_and_processor(out)
    t0 = time.time()
    records = {s: world.generate("eval", args.n, s) for s in seeds}
    metrics["fp"] = {}
    for s in seeds:
        rep = evaluate_records(fp, processor, records[s])
        metrics["fp"][s] = {
            "accuracy": rep["accuracy"],
            "per_type": {k: v["accuracy"] for k, v in rep["per_type"].items()},
        }
        print(f"FP seed {s}: {100 * rep['accuracy']:.1f}%  ({time.time() - t0:.0f}s)", flush=True)
    s0 = seeds[0]
    blank = [(world.blank_image(s0 + i), rec) for i, (_, rec) in enumerate(records[s0])]
    rep = evaluate_records(fp, processor, blank)
    metrics["blank_images"] = {
        "accuracy": rep["accuracy"],
        "per_type": {k: v["accuracy"] for k, v in rep["per_type"].items()},
    }
    metrics["majority_baseline"] = majority_baseline(records[s0])
    print(f"blank images: {100 * rep['accuracy']:.1f}%   majority baseline {100 * metrics['majority_baseline']:.1f}%")
    metrics["rtn"] = {}
    for label, spec in RTN_SETTINGS:
        q, _ = load_model_and_processor(out)
        rtn_(embedded.decoder_linears(q), spec)
        rep = evaluate_records(q, processor, records[s0], reference=(fp, processor))
        metrics["rtn"][label] = {"accuracy": rep["accuracy"], **rep["fidelity"]}
        print(
            f"RTN {label}: {100 * rep['accuracy']:.1f}%  agreement {100 * rep['fidelity']['agreement']:.1f}%  "
            f"KL {rep['fidelity']['kl']:.4f}",
            flush=True,
        )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k != "fp"}, indent=1))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
