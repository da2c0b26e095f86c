"""The clipping search (``weight_clip``) and duo scaling (``duo_scaling``) of the shared scale search.

They change the chosen weights, the scales they pick still fold without changing the FP function, the
clamped weights are what the quantizer stored (so the export packs them), a ``--scales`` replay and a
resumed run give the same bits, and they are refused where they would do nothing.
"""

import copy

import pytest
import torch
from _tiny import calibration, tiny_llava

import qig
from qig.errors import QigError
from qig.methods.config import make_config
from qig.models import family_for, get_module
from qig.quant.clip import CLIP_RATIOS, clip_weight
from qig.quant.fold import fold_scales_
from qig.quant.spec import QuantSpec, dequantize, quantize_with
from qig.runs import load_clips

METHODS = ["awq", "mbq", "qig"]


@pytest.fixture(scope="module")
def calib4():
    return calibration(4, seed=0)


@pytest.fixture(scope="module")
def runs(calib4):
    """Per (method, option): the quantized tiny model (1 layer, MHA: all four groups) and its result; W3 g32."""
    cache = {}

    def run(method: str, **options):
        key = (method, tuple(sorted(options.items())))
        if key not in cache:
            model = tiny_llava(outliers=True, layers=1, kv_heads=4)
            config = make_config(method, wbits=3, group_size=32, n_grid=5, **options)
            cache[key] = (model, qig.quantize(model, config, calib4, progress=False))
        return cache[key]

    return run


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "language_model.layers" in k}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("option", ["weight_clip", "duo_scaling"])
def test_the_option_changes_the_chosen_weights(runs, method, option):
    base, _ = runs(method)
    changed, result = runs(method, **{option: True})
    a, b = _weights(base), _weights(changed)
    assert any(not torch.equal(a[k], b[k]) for k in a), f"{method} {option} left every weight as it was"
    if option == "weight_clip":
        clips = result.clips()
        assert clips and all(
            set(r.unique().tolist()) <= set(torch.tensor(CLIP_RATIOS).tolist()) for r in clips.values()
        )
        assert any(bool((r < 1).any()) for r in clips.values()), "no group was clipped"


@pytest.mark.parametrize("method", METHODS)
def test_duo_scales_fold_without_changing_the_fp_function(runs, method):
    _, result = runs(method, duo_scaling=True)
    model = tiny_llava(outliers=True, layers=1, kv_heads=4)
    batch = next(calibration(4, seed=3).batches(4))
    with torch.no_grad():
        before = model(**batch.inputs).logits
        family = family_for(model)
        for li, layer in enumerate(family.decoder_layers(model)):
            for group in family.active_groups(layer):
                s = result.scales()[(li, group.name)]
                lins = [get_module(layer, p) for p in group.linears]
                fold_scales_(get_module(layer, group.prev), lins, s, offset=group.prev_offset)
        after = model(**batch.inputs).logits
    real = batch.inputs["attention_mask"].bool()
    assert (after - before)[real].norm() / before[real].norm() < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_the_stored_quantizer_params_are_the_clamped_weights(runs, method):
    """Each clipped linear holds Q(clip(W)): its kept scale and zero reproduce it bit for bit, and they are the
    min-max params of a weight clamped within the clip ratio of its group range (what the export packs)."""
    model, result = runs(method, weight_clip=True)
    spec = result.config.spec
    layer = family_for(model).decoder_layers(model)[0]
    for (li, path), ratios in result.clips().items():
        w = get_module(layer, path).weight.data
        params = result.quantized[f"{li}.{path}"]
        q = quantize_with(w, params["scale"], params["zero"], spec)
        assert torch.equal(dequantize(q, params["scale"], params["zero"], spec).to(w.dtype), w), path
        assert ratios.shape == params["scale"].shape, path  # one ratio per row and group


def test_clip_weight_shrinks_each_group_range_by_its_ratio():
    w = torch.randn(4, 64)
    ratio = torch.tensor(CLIP_RATIOS[:8]).reshape(4, 2)
    for spec in (QuantSpec(bits=3, group_size=32), QuantSpec(bits=4, group_size=32, symmetric=True)):
        c = clip_weight(w, ratio, spec).reshape(4, 2, 32)
        wg = w.reshape(4, 2, 32)
        if spec.symmetric:
            torch.testing.assert_close(c.abs().amax(-1), wg.abs().amax(-1) * ratio)
        else:
            torch.testing.assert_close(c.amax(-1), wg.amax(-1) * ratio)
            torch.testing.assert_close(c.amin(-1), wg.amin(-1) * ratio)
    assert torch.equal(clip_weight(w, torch.ones(4, 2), QuantSpec(bits=3, group_size=32)), w)


@pytest.mark.parametrize("method", ["awq", "qig"])
def test_saved_scales_and_clips_reproduce_the_run(runs, method, tmp_path):
    searched, result = runs(method, weight_clip=True, duo_scaling=True)
    result.save(tmp_path)
    scales, _ = qig.load_scales(tmp_path / "search.safetensors")
    clips = load_clips(tmp_path)
    assert clips.keys() == result.clips().keys()
    applied = tiny_llava(outliers=True, layers=1, kv_heads=4)
    again = qig.quantize(applied, result.config, scales=scales, clips=clips, progress=False)
    a, b = _weights(searched), _weights(applied)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.clips().keys() == clips.keys()
    without = tiny_llava(outliers=True, layers=1, kv_heads=4)
    qig.quantize(without, result.config, scales=scales, progress=False)
    assert any(not torch.equal(a[k], v) for k, v in _weights(without).items())


def test_a_resumed_clip_run_gives_the_same_bits(calib4, tmp_path):
    config = make_config("awq", wbits=3, group_size=32, n_grid=5, weight_clip=True)
    first = tiny_llava(outliers=True, layers=2)
    whole = qig.quantize(first, config, calib4, progress=False)
    work = tmp_path / "work"
    second = tiny_llava(outliers=True, layers=2)
    qig.quantize(copy.deepcopy(second), config, calib4, progress=False, work_dir=work)
    (work / "layer-00001.json").unlink()  # as if stopped after layer 0
    resumed = qig.quantize(second, config, calib4, progress=False, work_dir=work, resume=True)
    assert all(
        torch.equal(x, y) for x, y in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    assert resumed.clips().keys() == whole.clips().keys()
    assert all(torch.equal(resumed.clips()[k], r) for k, r in whole.clips().items())


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("awq", {"duo_scaling": True, "n_grid": 1}, "duo_scaling changes the candidates r > 0"),
        ("gptq", {"token_weights": "qig", "weight_clip": True}, "only lends its token weights, so --weight-clip"),
        ("gptq", {"token_weights": "mbq", "duo_scaling": True}, "only lends its token weights, so --duo-scaling"),
        ("rtn", {"weight_clip": True}, "rtn has no option --weight-clip"),
        ("smoothquant", {"wbits": 8, "abits": 8, "duo_scaling": True}, "smoothquant has no option --duo-scaling"),
        ("gptq", {"weight_clip": True}, "gptq has no option --weight-clip"),
    ],
    ids=["duo-one-candidate", "gptq-borrowed-clip", "gptq-borrowed-duo", "rtn", "smoothquant", "gptq"],
)
def test_refused_where_they_do_nothing(method, options, message):
    with pytest.raises(QigError, match=message) as err:
        make_config(method, **options)
    assert "\n" not in str(err.value)


def test_saved_clips_for_another_group_size_are_refused(runs, tmp_path):
    _, result = runs("awq", weight_clip=True)
    scales = result.scales()
    config = make_config("rtn", wbits=3, group_size=64)
    with pytest.raises(QigError, match="do not fit a weight"):
        qig.quantize(tiny_llava(outliers=True, layers=1, kv_heads=4), config, scales=scales, clips=result.clips())


def test_weight_activation_runs_clip_and_duo_scale_too(calib4):
    """W4A8 (symmetric per-channel weights): the clip bounds are +-ratio x absmax, the kept params reproduce W."""
    model = tiny_llava(outliers=True, layers=1)
    config = make_config("qig", wbits=4, abits=8, n_grid=4, weight_clip=True, duo_scaling=True)
    result = qig.quantize(model, config, calib4, progress=False)
    layer = family_for(model).decoder_layers(model)[0]
    assert result.clips() and all(r.shape[1] == 1 for r in result.clips().values())
    for (li, path), _ in result.clips().items():
        w = get_module(layer, path).weight.data
        p = result.quantized[f"{li}.{path}"]
        assert torch.equal(
            dequantize(quantize_with(w, p["scale"], p["zero"], config.spec), p["scale"], p["zero"], config.spec).to(
                w.dtype
            ),
            w,
        )
