"""The one layer loop: RTN equals rtn_, the quantizer parameters are kept, saved scales re-apply, W-A streams."""

import pytest
import torch
from _tiny import calibration, tiny_llava

import qig
from qig.errors import QigError
from qig.methods import AWQConfig, RTNConfig, SmoothQuantConfig
from qig.models import family_for
from qig.pipeline.finish import LayerState, LookOnly, RoundToNearest
from qig.pipeline.loop import LoopObserver
from qig.pipeline.run import run_layerwise
from qig.pipeline.timing import Timer
from qig.quant.activation import activation_quantization
from qig.quant.rtn import rtn_
from qig.quant.spec import dequantize, quantize_with


def _linears(layer):
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def _assert_kept_parameters_reproduce_the_weights(model, result):
    layers = family_for(model).decoder_layers(model)
    assert sorted(result.quantized) == sorted(f"{i}.{n}" for i, layer in enumerate(layers) for n in _linears(layer))
    spec = result.config.spec
    for key, params in result.quantized.items():
        li, name = key.split(".", 1)
        w = layers[int(li)].get_submodule(name).weight.data
        scale, zero = params["scale"], params["zero"]
        assert torch.equal(dequantize(quantize_with(w, scale, zero, spec), scale, zero, spec).to(w.dtype), w), key


def test_rtn_through_the_pipeline_equals_rtn_and_keeps_its_parameters():
    a, b = tiny_llava(), tiny_llava()
    config = RTNConfig(wbits=3, group_size=32)
    result = qig.quantize(a, config, progress=False)
    for layer in b.model.language_model.layers:
        rtn_(_linears(layer), config.spec)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    # nothing outside the decoder layers is touched
    assert torch.equal(a.lm_head.weight, tiny_llava().lm_head.weight)
    _assert_kept_parameters_reproduce_the_weights(a, result)
    assert list(result.timings) == ["quantize"] and result.groups == []


@pytest.mark.parametrize(
    "config",
    [AWQConfig(wbits=3, group_size=32, n_grid=5), SmoothQuantConfig(wbits=8, abits=8, group_size=None)],
    ids=["awq-w3", "smoothquant-w8a8"],
)
def test_saved_scales_reproduce_the_searched_model_and_its_parameters(tmp_path, config):
    searched = tiny_llava(outliers=True)
    result = qig.quantize(searched, config, calibration(4), progress=False)
    _assert_kept_parameters_reproduce_the_weights(searched, result)
    result.save(tmp_path)
    scales, saved_config = qig.load_scales(tmp_path / "search.safetensors")
    assert saved_config["method"] == config.name and saved_config["wbits"] == config.wbits
    applied = tiny_llava(outliers=True)
    again = qig.quantize(applied, config, scales=scales, progress=False)
    assert all(
        torch.equal(x, y) for x, y in zip(searched.state_dict().values(), applied.state_dict().values(), strict=True)
    )
    assert again.quantized.keys() == result.quantized.keys()
    assert all(torch.equal(again.quantized[k]["scale"], p["scale"]) for k, p in result.quantized.items())
    assert [g.group for g in again.groups] == [g.group for g in result.groups if g.scales is not None]


def test_saved_scales_for_groups_the_model_lacks_are_refused():
    with pytest.raises(QigError, match="layer 7 attn_in"):
        qig.quantize(tiny_llava(), RTNConfig(wbits=3, group_size=32), scales={(7, "attn_in"): torch.ones(128)})


def test_a_calibrated_method_without_calibration_is_refused():
    with pytest.raises(QigError, match="needs calibration data"):
        qig.quantize(tiny_llava(), AWQConfig(wbits=3, group_size=32), progress=False)


def test_wa_search_sees_the_inputs_of_the_quantized_model(monkeypatch):
    """W-A: each layer's x^q is its input in the finished W-A model (weights and activations quantized below)."""
    from qig.pipeline import loop

    seen = {}
    search = loop.search_scales

    def recording(ctx, weights, *args):
        found = search(ctx, weights, *args)
        seen[(ctx.layer_index, ctx.group.name)] = (ctx.x[0].clone(), ctx.xq[0].clone(), found.scales)
        return found

    monkeypatch.setattr(loop, "search_scales", recording)
    model, calib = tiny_llava(layers=3, outliers=True), calibration(4)
    result = qig.quantize(model, AWQConfig(wbits=4, abits=8, group_size=None, n_grid=4), calib, progress=False)
    spec, n = activation_quantization(model)
    assert spec.bits == 8 and n == 3 * 7  # q k v o gate up down in each layer
    _assert_kept_parameters_reproduce_the_weights(model, result)
    assert all(bool((p["zero"] == 0).all()) for p in result.quantized.values())  # symmetric per channel

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


class _Seen(LoopObserver):
    def __init__(self):
        self.events = []

    def layer_started(self, layer, streams):
        self.events.append(("start", layer.index, len(streams.chunks)))

    def group_visited(self, visit):
        self.events.append(("group", visit.layer.index, visit.group.name, visit.record, visit.found, visit.phases))

    def layer_finished(self, layer, finished):
        self.events.append(("finish", layer.index, sorted(finished.quantized)))


def test_observers_see_every_layer_and_group_in_order():
    """The loop's hooks: a start, its groups (each with its record, its search result and phases), a finish."""
    model, calib = tiny_llava(layers=2), calibration(4)
    seen = _Seen()
    result = run_layerwise(model, AWQConfig(wbits=3, group_size=32, n_grid=4), calib, progress=False, observers=[seen])
    kinds = [e[0] for e in seen.events]
    per_layer = ["start"] + ["group"] * (len(result.groups) // 2) + ["finish"]
    assert kinds == per_layer * 2
    groups = [e for e in seen.events if e[0] == "group"]
    assert [e[3] for e in groups] == result.groups  # the records the result keeps, the same objects
    for _, li, name, record, found, phases in groups:
        assert (record.layer, record.group) == (li, name)
        assert torch.equal(found.scales.float(), record.scales) and found.ratio == record.ratio
        assert {"group_inputs", "token_weights", "search"} <= set(phases)
    finishes = [e for e in seen.events if e[0] == "finish"]
    assert [f[2] for f in finishes] == [sorted(_linears(layer)) for layer in family_for(model).decoder_layers(model)]


def test_the_finisher_decides_what_x_q_meets():
    """LookOnly leaves the model untouched; RoundToNearest quantizes it in place with the kept parameters."""
    model = tiny_llava(layers=1)
    layer = family_for(model).decoder_layers(model)[0]
    before = {n: m.weight.detach().clone() for n, m in _linears(layer).items()}
    spec = RTNConfig(wbits=3, group_size=32).spec
    state = LayerState(0, layer)
    looked = LookOnly(spec).apply(state, family_for(model), None, Timer())
    assert all(torch.equal(m.weight, before[n]) for n, m in _linears(layer).items())
    assert looked.quantized == {} and sorted(looked.xq_weights) == sorted(f"{n}.weight" for n in before)
    done = RoundToNearest(spec).apply(state, family_for(model), None, Timer())
    assert done.xq_weights is None and sorted(done.quantized) == sorted(before)
    for n, m in _linears(layer).items():
        assert torch.equal(m.weight, looked.xq_weights[f"{n}.weight"])  # the same quantizer, in place this time
