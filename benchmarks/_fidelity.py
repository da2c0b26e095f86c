"""How close a quantized folder's next-token predictions stay to its FP model's, on held-out samples.

The score of ``benchmarks/vs_llmcompressor.py``'s real-width rows, whose random weights make accuracy meaningless.
Every folder, the FP model, qig's output or llm-compressor's (compressed-tensors), is loaded by
``qig.loading.load_model_and_processor`` and given the same inputs: the embedded world's eval split rendered once by
the FP model's processor (``qig.calib.render_for``). Over every position of every sample: the mean
KL(FP || quantized) of the next-token distributions in nats, and the share of positions whose top-1 token agrees.

    >>> ref = reference("/tmp/qig-peer-models/llava-qwen2-0.5b-L4", n=8)  # doctest: +SKIP
    >>> score(ref, "out/awq-w4-real-qig-awq-r0")  # doctest: +SKIP
    {'kl': 0.0123, 'top1': 97.1}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

HELD_OUT_SEED = 4321  # eval records no calibration split and no eval seed of the benchmark draws


@dataclass
class Reference:
    """The held-out inputs and the FP model's next-token log-probabilities on each."""

    inputs: list[dict[str, torch.Tensor]]  # processor outputs, batch 1
    log_probs: list[torch.Tensor]  # [T, V] each


def log_probs(folder: str | Path, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Next-token log-probabilities of the model in ``folder`` (loaded as qig loads any folder) on each input."""
    from qig.loading import load_model_and_processor

    model, _ = load_model_and_processor(folder)
    with torch.no_grad():
        return [torch.log_softmax(model(**x).logits[0].float(), dim=-1) for x in inputs]  # [T, V]


def reference(fp_folder: str | Path, n: int) -> Reference:
    """``n`` held-out eval samples rendered by the FP model's processor, and its log-probabilities on them."""
    from qig.calib import render_for
    from qig.embedded import world
    from qig.loading import load_model_and_processor

    model, processor = load_model_and_processor(fp_folder)
    inputs = [s.inputs for s in render_for(model, processor, world.generate("eval", n, HELD_OUT_SEED)).samples]
    return Reference(inputs, log_probs(fp_folder, inputs))


def score(ref: Reference, folder: str | Path) -> dict[str, float]:
    """Mean KL(FP || quantized) in nats and top-1 agreement in % over all positions of the held-out samples."""
    kl, agree, positions = 0.0, 0, 0
    for p, q in zip(ref.log_probs, log_probs(folder, ref.inputs), strict=True):  # [T, V] each
        kl += float((p.exp() * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        positions += p.shape[0]
    return {"kl": kl / positions, "top1": 100 * agree / positions}
