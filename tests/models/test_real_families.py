"""Every supported family on a tiny random model of its own transformers class, with its own processor.

Per family: the entry maps the model (groups, parts kept in FP), calibration
roles mark exactly the positions the model fills with image features, folding
random scales keeps the logits, captured layer inputs replay the decoder, and
every method quantizes it end to end (RTN, AWQ, MBQ, QIG, GPTQ weight-only;
QIG at W4A8; SmoothQuant at W8A8) with the quantized model still generating.
"""

import dataclasses

import pytest
import torch
from _families import TINY, build, image
from _tiny import fold_random_scales_

import qig
from qig.calib import ANSWER, PAD, VISION, from_records
from qig.errors import QigError
from qig.models import family_for
from qig.pipeline import capture, next_input
from qig.quant.activation import activation_quantization

FAMILIES = list(TINY)
# Multi-head attention (v -> o exists) in LLaVA-1.5's Llama and in the tiny Gemma 3; GQA elsewhere.
MHA = {"llava-1.5", "gemma3"}
CAPTION = "two objects : a red circle at the top left and a blue square ."


def records():
    """Two samples: two images of different sizes (dynamic resolution / tiling), and one image."""
    turns = [{"from": "human", "value": "<image>\ndescribe the image.<image>"}, {"from": "gpt", "value": CAPTION}]
    one = [{"from": "human", "value": "<image>\ndescribe the image."}, {"from": "gpt", "value": "a cross ."}]
    return [
        ([image(48, 48, 0), image(32, 64, 1)], {"id": "two", "conversations": turns}),
        ([image(64, 32, 2)], {"id": "one", "conversations": one}),
    ]


def calibration(model, proc):
    fam = family_for(model)
    return from_records(
        records(), proc, image_token_id=fam.vision_token_id(model, proc), image_seq_length=fam.image_seq_length(model)
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_entry_maps_the_model(name):
    model, _ = build(name)
    fam = family_for(model)
    assert fam.name == TINY[name].family
    layers = fam.decoder_layers(model)
    assert len(layers) == 2
    expected = ["attn_in", "attn_out", "mlp_in", "mlp_out"] if name in MHA else ["attn_in", "mlp_in", "mlp_out"]
    assert [g.name for g in fam.active_groups(layers[0])] == expected
    for path in fam.keep_fp:
        model.get_submodule(path)  # raises if the entry names a part the model does not have
    decoder = {id(p) for p in layers.parameters()}
    kept = {id(p) for path in fam.keep_fp for p in model.get_submodule(path).parameters()}
    assert kept and not kept & decoder


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_vision_roles_are_the_positions_filled_with_image_features(name):
    model, proc = build(name)
    calib = calibration(model, proc)
    image_token = model.config.image_token_id
    n_images = [2, 1]
    for sample, k in zip(calib.samples, n_images, strict=True):
        inserted = int((sample.inputs["input_ids"][0] == image_token).sum())
        assert inserted >= k  # the processor expanded every image placeholder
        assert int((sample.roles == VISION).sum()) == inserted
        answer = proc.tokenizer.decode(sample.inputs["input_ids"][0][sample.roles == ANSWER], skip_special_tokens=True)
        assert answer.replace(" ", "").startswith(sample_caption(sample.id).replace(" ", ""))
    # The model's own view: the decoder's input differs from the token embeddings exactly where
    # it placed image features (a padded batch of both samples, through the pipeline's capture).
    (chunk,) = capture(model, family_for(model), calib, batch_size=2, device=torch.device("cpu"))
    batch = next(calib.batches(2))
    embedded = model.get_input_embeddings()(batch.inputs["input_ids"])
    filled = (chunk.x != embedded).any(-1)  # [b, T]
    real = batch.roles != PAD
    assert torch.equal(filled[real], (batch.roles == VISION)[real])


def sample_caption(sid: str) -> str:
    return CAPTION if sid == "two" else "a cross ."


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_folding_random_scales_keeps_the_logits(name):
    model, proc = build(name)
    batch = next(calibration(model, proc).batches(2))
    before = model(**batch.inputs).logits
    fold_random_scales_(model)
    after = model(**batch.inputs).logits
    real = batch.roles != PAD
    rel = (after - before)[real].norm() / before[real].norm()
    assert rel < 1e-4


METHODS = {
    "rtn": qig.RTNConfig(wbits=4, group_size=32),
    "awq": qig.AWQConfig(wbits=4, group_size=32, n_grid=4),
    "qig": qig.QIGConfig(wbits=4, group_size=32, n_grid=4),
    "mbq": qig.MBQConfig(wbits=4, group_size=32, n_grid=4),
    "gptq": qig.GPTQConfig(wbits=4, group_size=32),
    "qig-w4a8": qig.QIGConfig(wbits=4, abits=8, group_size=None, n_grid=4),
    "smoothquant-w8a8": qig.SmoothQuantConfig(wbits=8, abits=8, group_size=None),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", FAMILIES)
def test_quantize_end_to_end_and_generate(name, method):
    model, proc = build(name)
    fam = family_for(model)
    config = METHODS[method]
    kept = {f"{path}.{k}": v.clone() for path in fam.keep_fp for k, v in model.get_submodule(path).state_dict().items()}
    calib = calibration(model, proc)
    result = qig.quantize(model, config, None if method == "rtn" else calib, progress=False)

    layers = fam.decoder_layers(model)
    if config.name not in ("rtn", "gptq"):  # a scale per active group of every layer
        searched = {(g.layer, g.group) for g in result.groups if g.scales is not None}
        assert searched == {(i, g.name) for i, layer in enumerate(layers) for g in fam.active_groups(layer)}
    group = config.group_size or max(m.in_features for m in layers.modules() if isinstance(m, torch.nn.Linear))
    for layer in layers:
        for lin in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
            rows = lin.weight.detach().reshape(-1, min(group, lin.in_features))  # [out * n_groups, group]
            assert max(len(torch.unique(row)) for row in rows[:64]) <= 2**config.wbits  # values per group
    linears = sum(isinstance(m, torch.nn.Linear) for m in layers.modules())
    installed = activation_quantization(model)
    if config.abits < 16:  # W4A8: every decoder linear quantizes its input per token at run time
        assert installed is not None and installed[0].bits == 8 and installed[1] == linears
    else:
        assert installed is None
    for path in fam.keep_fp:
        for k, v in model.get_submodule(path).state_dict().items():
            assert torch.equal(v, kept[f"{path}.{k}"]), f"{path}.{k} changed"

    batch = next(calib.batches(2))
    one = {k: v for k, v in calib.samples[1].inputs.items()}
    with torch.no_grad():
        out = model.generate(**one, max_new_tokens=3, do_sample=False)
        logits = model(**batch.inputs).logits
    assert out.shape[1] == one["input_ids"].shape[1] + 3
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_captured_layer_inputs_replay_the_decoder(name):
    """Layer by layer from the captured input and kwargs (M-RoPE positions, sliding masks, DeepStack additions)."""
    model, proc = build(name)
    fam = family_for(model)
    calib = calibration(model, proc)
    batch = next(calib.batches(2))
    layers = fam.decoder_layers(model)
    seen = {}
    layers[-1].register_forward_hook(lambda _m, _a, out: seen.setdefault("h", out))
    model(**batch.inputs)
    (chunk,) = capture(model, fam, calib, batch_size=2, device=torch.device("cpu"))
    assert bool(chunk.injections) == fam.adds_between_layers
    h = chunk.x
    for i, layer in enumerate(layers[:-1]):
        h = next_input(layer, h, chunk, i)
    h = layers[-1](h, **chunk.layer_kwargs[len(layers) - 1])
    real = batch.roles != PAD
    assert torch.allclose(h[real], seen["h"][real], atol=1e-5)


def test_an_undeclared_change_between_layers_is_refused():
    model, proc = build("qwen3-vl")
    undeclared = dataclasses.replace(family_for(model), adds_between_layers=False)
    with pytest.raises(QigError, match="between decoder layers 0 and 1.*does not declare it"):
        capture(model, undeclared, calibration(model, proc), batch_size=2, device=torch.device("cpu"))


@pytest.mark.parametrize("name", ["qwen2-vl", "idefics3"], ids=["dynamic-resolution", "tiling"])
def test_a_length_cap_through_image_tokens_is_refused(name):
    model, proc = build(name)
    fam = family_for(model)
    with pytest.raises(QigError, match="sample two: the length cap 12 cuts through its image tokens"):
        from_records(records(), proc, max_length=12, image_token_id=fam.vision_token_id(model, proc))


@pytest.mark.parametrize("name", ["gemma3", "llava-next"], ids=["fixed-soft-tokens", "anyres-tiling"])
def test_quantize_command_on_a_saved_family_folder(name, tmp_path):
    """The CLI path: processor loaded back from the folder, image token and per-image count from the family."""
    import json

    from _cli import run_cli

    from qig.evaluate import load_model_and_processor

    model, proc = build(name)
    model.save_pretrained(tmp_path / "model")
    proc.save_pretrained(tmp_path / "model")
    (tmp_path / "calib" / "images").mkdir(parents=True)
    rows = []
    for i, (images, rec) in enumerate(records()):
        names = [f"images/{i}-{j}.png" for j in range(len(images))]
        for im, n in zip(images, names, strict=True):
            im.save(tmp_path / "calib" / n)
        rows.append({**rec, "image": names})
    (tmp_path / "calib" / "data.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    argv = ["quantize", "--model", tmp_path / "model", "--method", "awq", "--wbits", 4, "--group-size", 32]
    argv += ["--calib", tmp_path / "calib" / "data.json", "--n-samples", 2, "--n-grid", 4, "--output", out]
    assert run_cli(*argv, "--no-progress") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_calibration_samples"] == 2
    from safetensors.torch import load_file

    roles = load_file(out / "search.safetensors")["roles"]
    inserted = sum(
        int((s.inputs["input_ids"] == model.config.image_token_id).sum()) for s in calibration(model, proc).samples
    )
    assert int((roles == VISION).sum()) == inserted
    quantized, _ = load_model_and_processor(out)
    q_proj = family_for(quantized).decoder_layers(quantized)[0].self_attn.q_proj.weight.detach()
    assert max(len(torch.unique(row)) for row in q_proj.reshape(-1, 32)) <= 16
