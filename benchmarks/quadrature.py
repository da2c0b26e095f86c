"""QIG's quadrature against the official 32-step Riemann rule: the token ranking per group kind (a benchmark).

    python benchmarks/quadrature.py                        # 2, 4 and 8 Gauss-Legendre nodes, embedded model
    python benchmarks/quadrature.py --steps 2 3 --n-samples 64 --baseline zero

For every group of every decoder layer, QIG's token weights (lambda, after
the IQR clip) under K-node Gauss-Legendre (K in every group, attention
blocks included; the default is 2, ``attention_steps`` raises it there) and under the 32-step Riemann
rule, on the same streams (``qig.pipeline.run.collect_token_weights``: x^q
through the layers below quantized by RTN, nothing searched), are compared
by their Spearman rank correlation per calibration sample over its real
tokens. Printed per group kind (attention input, MLP input, MLP output ...)
and K: the mean and the minimum over samples and layers, and the seconds
each rule's weights took.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--steps", nargs="+", type=int, default=[2, 4, 8], help="Gauss-Legendre node counts")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--wbits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--baseline", choices=["quantized", "zero"], default="quantized")
    args = p.parse_args(argv)

    import torch
    from _ranks import spearman_rows  # benchmarks/, the script's own folder

    from qig.calib import PAD, calibration_for
    from qig.loading import load_model_and_processor
    from qig.methods import QIGConfig
    from qig.models import family_for
    from qig.pipeline.run import collect_token_weights

    model, processor = load_model_and_processor(args.model, dtype=torch.float32)
    calib = calibration_for(model, processor, n_samples=args.n_samples)
    common = dict(wbits=args.wbits, group_size=args.group_size, baseline=args.baseline)
    rules = {"riemann-32": QIGConfig(steps=32, quadrature="riemann", **common)}
    rules.update({f"gauss-legendre-{k}": QIGConfig(steps=k, attention_steps=1, **common) for k in args.steps})
    n_layers = len(family_for(model).decoder_layers(model))
    weights, seconds = {}, {}
    for name, config in rules.items():
        start = time.perf_counter()
        groups, _ = collect_token_weights(model, [config], calib, list(range(n_layers)), progress=False)
        seconds[name] = time.perf_counter() - start
        weights[name] = {(g.layer, g.group): g.weights["qig"] for g in groups}
    real = calib.roles != PAD
    print(f"{args.n_samples} samples, W{args.wbits} g{args.group_size}, baseline {args.baseline}")
    print("Spearman of lambda per sample vs riemann-32 (over real tokens): mean / min over samples and layers")
    ref = weights["riemann-32"]
    kinds = sorted({g for _, g in ref})
    print("group kind   " + "  ".join(f"{name:>22s}" for name in rules if name != "riemann-32"))
    for kind in kinds:
        cells = []
        for name in rules:
            if name == "riemann-32":
                continue
            rho = []
            for (li, g), w in ref.items():
                if g == kind:
                    rho += spearman_rows(weights[name][(li, g)], w, real)
            cells.append(f"{statistics.fmean(rho):.4f} / {min(rho):.4f}")
        print(f"{kind:11s}  " + "  ".join(f"{c:>22s}" for c in cells))
    print("seconds: " + ", ".join(f"{name} {s:.1f}" for name, s in seconds.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
