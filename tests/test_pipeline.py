"""The layer-wise pipeline: captured layer inputs replay the model; RTN equals rtn_; saved scales re-apply."""

import torch
from _tiny import calibration, tiny_llava

import qig
from qig.methods import AWQConfig, RTNConfig
from qig.models import family_for
from qig.pipeline import capture
from qig.quant.rtn import rtn_


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
    h = chunk.x
    for i, layer in enumerate(fam.decoder_layers(model)):
        h = layer(h, **chunk.layer_kwargs[i])
    real = batch.inputs["attention_mask"].bool()
    assert torch.allclose(h[real], seen["h"][real], atol=1e-5)


def test_rtn_through_the_pipeline_equals_rtn_():
    a, b = tiny_llava(), tiny_llava()
    config = RTNConfig(wbits=3, group_size=32)
    qig.quantize(a, config, progress=False)
    for layer in b.model.language_model.layers:
        rtn_({n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}, config.spec)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    # nothing outside the decoder layers is touched
    assert torch.equal(a.lm_head.weight, tiny_llava().lm_head.weight)


def test_saved_scales_reproduce_the_searched_model(tmp_path):
    config = AWQConfig(wbits=3, group_size=32, n_grid=5)
    searched = tiny_llava(outliers=True)
    result = qig.quantize(searched, config, calibration(4), progress=False)
    result.save(tmp_path)
    scales, saved_config = qig.load_scales(tmp_path / "search.safetensors")
    assert saved_config["method"] == "awq" and saved_config["wbits"] == 3
    applied = tiny_llava(outliers=True)
    qig.quantize(applied, config, scales=scales, progress=False)
    assert all(
        torch.equal(x, y) for x, y in zip(searched.state_dict().values(), applied.state_dict().values(), strict=True)
    )


def test_gptq_hessians_see_the_inputs_of_the_final_quantized_model(monkeypatch):
    """Sequential GPTQ: each linear's Hessian comes from the input it has in the finished quantized model."""
    from qig.methods import GPTQConfig
    from qig.quant import gptq

    seen: list[torch.Tensor] = []
    add = gptq.Hessian.add
    monkeypatch.setattr(gptq.Hessian, "add", lambda self, x, *a, **k: (seen.append(x.clone()), add(self, x, *a, **k)))
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


def test_wa_search_sees_the_inputs_of_the_quantized_model(monkeypatch):
    """W-A: each layer's x^q is its input in the finished W-A model (weights and activations quantized below)."""
    from qig import pipeline
    from qig.pipeline import activation_quantization

    seen = {}
    search = pipeline.search_scales

    def recording(ctx, weights, *args):
        found = search(ctx, weights, *args)
        seen[(ctx.layer_index, ctx.group.name)] = (ctx.x[0].clone(), ctx.xq[0].clone(), found.scales)
        return found

    monkeypatch.setattr(pipeline, "search_scales", recording)
    model, calib = tiny_llava(layers=3, outliers=True), calibration(4)
    qig.quantize(model, AWQConfig(wbits=4, abits=8, group_size=None, n_grid=4), calib, progress=False)
    spec, n = activation_quantization(model)
    assert spec.bits == 8 and n == 3 * 7  # q k v o gate up down in each layer

    final = []
    for layer in family_for(model).decoder_layers(model):
        # prepend: the input as the linear receives it, before its own activation quantizer
        layer.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: final.append(a[0]), prepend=True)
    batch = next(calib.batches(4))
    with torch.no_grad():
        model(**batch.inputs)
    real = batch.roles != 0
    for li, x_final in enumerate(final):
        x, xq, s = seen[(li, "attn_in")]
        # the search saw the group's input before its own fold; the model divides it by s
        assert torch.allclose((xq / s)[real], x_final[real], rtol=1e-4, atol=1e-5)
        if li > 0:  # the streams have diverged: x^q is not the FP input
            assert not torch.allclose(xq[real], x[real], rtol=1e-3, atol=1e-3)
