"""Capture: the captured layer inputs replay the decoder; next_input with weight overrides."""

import torch
from _tiny import calibration, tiny_llava

from qig.models import family_for
from qig.pipeline import capture, next_input
from qig.quant.spec import QuantSpec, fake_quantize


@torch.no_grad()
def test_captured_inputs_replay_the_decoder():
    model = tiny_llava(layers=2)
    calib = calibration(4)
    batch = next(calib.batches(4))
    seen = {}
    model.model.language_model.norm.register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0]))
    model(**batch.inputs)
    fam = family_for(model)
    (chunk,) = capture(model, fam, calib, batch_size=4, device=torch.device("cpu"))
    assert chunk.xq is chunk.x  # one tensor until the streams diverge
    h = chunk.x
    for i, layer in enumerate(fam.decoder_layers(model)):
        h = next_input(layer, h, chunk, i)
    real = batch.inputs["attention_mask"].bool()
    assert torch.allclose(h[real], seen["h"][real], atol=1e-5)


@torch.no_grad()
def test_weight_overrides_equal_writing_the_weights_in():
    model = tiny_llava(layers=1)
    fam = family_for(model)
    (chunk,) = capture(model, fam, calibration(2), batch_size=2, device=torch.device("cpu"))
    layer = fam.decoder_layers(model)[0]
    spec = QuantSpec(3, 32)
    params = {
        f"{n}.weight": fake_quantize(m.weight, spec) for n, m in layer.named_modules() if hasattr(m, "in_features")
    }
    overridden = next_input(layer, chunk.x, chunk, 0, params)
    for key, w in params.items():
        layer.get_submodule(key.removesuffix(".weight")).weight.copy_(w)
    assert torch.equal(overridden, next_input(layer, chunk.x, chunk, 0))
