"""GPTQ staging: each linear's Hessian comes from the input it has in the finished quantized model."""

import torch
from _tiny import calibration, tiny_llava

import qig
from qig.methods import GPTQConfig
from qig.models import family_for


def test_gptq_hessians_see_the_inputs_of_the_final_quantized_model(monkeypatch):
    from qig.quant import gptq

    seen: list[torch.Tensor] = []
    part = gptq.Hessian.part  # each chunk's share, accumulated in chunk order
    monkeypatch.setattr(
        gptq.Hessian, "part", lambda self, x, *a, **k: (seen.append(x.clone()), part(self, x, *a, **k))[1]
    )
    model, calib = tiny_llava(layers=2), calibration(4)
    qig.quantize(model, GPTQConfig(wbits=3, group_size=32), calib, progress=False)
    # per layer, stages [q k v] [o] [gate up] [down], one chunk each
    assert len(seen) == 2 * 4

    batch = next(calib.batches(4))
    final: list[torch.Tensor] = []
    layers = family_for(model).decoder_layers(model)
    for layer in layers:
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            layer.get_submodule(name).register_forward_pre_hook(lambda _m, a: final.append(a[0]))
    with torch.no_grad():
        model(**batch.inputs)
    real = batch.roles != 0
    for x_gptq, x_final in zip(seen, final, strict=True):
        assert torch.allclose(x_gptq[real], x_final[real], atol=1e-5)
