"""What the NaN / inf checks cost: one ``isfinite(t).all()`` per tensor (before) against min/max first (now).

    python benchmarks/finite_checks.py                     # Qwen2-0.5B widths, 24 layers, float32 and bfloat16
    python benchmarks/finite_checks.py --layers 6 --repeats 2

The model is a random-weight LLaVA-OneVision with Qwen2-0.5B's decoder
(``benchmarks/_random_models.py``: hidden 896, intermediate 4864) built in
memory, no file written. Timed, each the best of ``--repeats``:

- the whole state dict, as ``qig.runs.check_finite_output`` checks it before a
  run folder is written;
- the decoder linears, as ``qig.pipeline.finite.check_decoder_weights`` checks
  them before the first layer;
- one calibration stream chunk [16, 1585, 896] (16 samples of the 1x1 grid's
  tokens), as every layer's output is checked on each stream.

"before" is the check as it was: ``bool(torch.isfinite(t).all())`` per tensor.
"now" is ``qig.pipeline.finite``: ``torch.aminmax`` per tensor, every verdict
looked at once. The two agree on every tensor (checked here on a clean model
and with one NaN planted in the last layer).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from _random_models import onevision_config  # noqa: E402


def before(named) -> str | None:
    """The check as it was: a full isfinite mask per tensor, then all()."""
    for name, t in named:
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            return name
    return None


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    from transformers import LlavaOnevisionForConditionalGeneration

    from qig.models import family_for
    from qig.pipeline.finite import first_non_finite, is_finite

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = p.parse_args(argv)
    torch.manual_seed(0)
    load = os.getloadavg()
    print(
        f"Qwen2-0.5B widths, {args.layers} layers, random weights; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"best of {args.repeats}"
    )
    print(f"{'dtype':<9} {'what':<28} {'tensors':>7} {'GiB':>6} {'before s':>9} {'now s':>8} {'x':>6}")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        model = LlavaOnevisionForConditionalGeneration(onevision_config(args.layers)).to(dtype).eval()
        family = family_for(model)
        state = dict(model.state_dict())
        linears = [
            (f"{path}.{n}", p.data)
            for path, lin in family.decoder_linears(model).items()
            for n, p in lin.named_parameters(recurse=False)
        ]
        hidden = [("stream chunk", torch.randn(16, 1585, 896).to(dtype))]
        for what, named in (("state dict", list(state.items())), ("decoder linears", linears), ("hidden", hidden)):
            assert before(named) is None and first_non_finite(named) is None
            gib = sum(t.numel() * t.element_size() for _, t in named) / 2**30
            old = best(lambda named=named: before(named), args.repeats)
            if what == "hidden":
                new = best(lambda named=named: is_finite(named[0][1]), args.repeats)
            else:
                new = best(lambda named=named: first_non_finite(named), args.repeats)
            print(f"{name:<9} {what:<28} {len(named):>7} {gib:>6.2f} {old:>9.3f} {new:>8.3f} {old / new:>6.1f}")
        last = linears[-1][1]
        last.view(-1)[7] = float("nan")  # one NaN in the last linear: both name the same tensor
        assert before(linears) == first_non_finite(linears) == linears[-1][0]
        del model, state, linears
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
