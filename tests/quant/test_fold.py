"""Folding channel scales keeps the FP model's function."""

import torch
from _tiny import calibration, tiny_llava

from qig.models import family_for, get_module
from qig.quant.fold import fold_scales_, scaled_fake_quantize
from qig.quant.spec import QuantSpec, fake_quantize


@torch.no_grad()
def test_folding_random_scales_keeps_logits():
    model = tiny_llava(layers=2, kv_heads=4, outliers=True)  # MHA: all four groups, v->o included
    batch = next(calibration(4).batches(4))
    before = model(**batch.inputs).logits
    fam = family_for(model)
    g = torch.Generator().manual_seed(0)
    for layer in fam.decoder_layers(model):
        for group in fam.active_groups(layer):
            lins = [get_module(layer, p) for p in group.linears]
            s = torch.exp(torch.randn(lins[0].in_features, generator=g))  # scales spanning ~e^+-3
            fold_scales_(get_module(layer, group.prev), lins, s)
    after = model(**batch.inputs).logits
    real = batch.inputs["attention_mask"].bool()
    rel = (after - before)[real].norm() / before[real].norm()
    assert rel < 1e-4


def test_scale_one_is_plain_quantization():
    w = torch.randn(16, 64)
    spec = QuantSpec(bits=3, group_size=32)
    assert torch.equal(scaled_fake_quantize(w, torch.ones(64), spec), fake_quantize(w, spec))
