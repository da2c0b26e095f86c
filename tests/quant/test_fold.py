"""Folding channel scales keeps the FP model's function."""

import torch
from _tiny import calibration, fold_random_scales_, tiny_llava

from qig.quant.fold import scaled_fake_quantize
from qig.quant.spec import QuantSpec, fake_quantize


@torch.no_grad()
def test_folding_random_scales_keeps_logits():
    model = tiny_llava(layers=2, kv_heads=4, outliers=True)  # MHA: all four groups, v->o included
    batch = next(calibration(4).batches(4))
    before = model(**batch.inputs).logits
    fold_random_scales_(model)
    after = model(**batch.inputs).logits
    real = batch.inputs["attention_mask"].bool()
    rel = (after - before)[real].norm() / before[real].norm()
    assert rel < 1e-4


def test_scale_one_is_plain_quantization():
    w = torch.randn(16, 64)
    spec = QuantSpec(bits=3, group_size=32)
    assert torch.equal(scaled_fake_quantize(w, torch.ones(64), spec), fake_quantize(w, spec))
