"""MBQ's layer-wise answer-loss gradients equal full autograd's, and MBQ's search does not change with them.

The layer-wise pass (``qig.pipeline.gradients.answer_gradients``) against the
whole-model backward (``full_autograd_gradients``) on the embedded model and on
tiny models of every family (tests/models/_families.py: M-RoPE, Qwen3-VL's
DeepStack additions between and after the layers, Gemma 3's sliding-window
layers, tiles), a tiny LLaVA with one batch without answer tokens, and the
InternVL2 toy whose layers return tuples.
"""

import logging
import sys
from pathlib import Path

import pytest
import torch
from _tiny import calibration, tiny_llava
from tqdm.auto import tqdm

import qig
from qig.calib import ANSWER, PROMPT, CalibrationSet, Sample, calibration_for, from_records
from qig.loading import load_model_and_processor
from qig.methods import MBQConfig, method_for
from qig.models import family_for, get_module
from qig.pipeline import gradients
from qig.pipeline.gradients import (
    _empty_sums,
    _on_output,
    answer_gradients,
    answer_loss,
    prepare_methods,
    sublayer_outputs,
)
from qig.pipeline.layers import InMemoryLayers, layers_for
from qig.pipeline.loop import frozen

MODELS = Path(__file__).parents[1] / "models"  # the tiny family builders (_families) and the InternVL2 toy
RTOL = 1e-4


def full_autograd_gradients(model, family, calib, device, batch_size: int, progress: bool = True) -> dict:
    """The reference for ``answer_gradients``: the loss back-propagated through the whole model at once.

    Every decoder layer is on the device together; hooks on each layer's
    sub-layer output linears accumulate the same sums.
    """
    device = torch.device(device)
    modules = family.decoder_layers(model)
    paths = sublayer_outputs(family)
    sums = _empty_sums(paths, len(modules))
    roles: list[torch.Tensor] = []  # the current batch's [b, T]

    def needs_grad(_module, args, kwargs):
        # The parameters are frozen; gradients start at the decoder's input.
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs

    handles = [modules[0].register_forward_pre_hook(needs_grad, with_kwargs=True)]
    for li, module in enumerate(modules):
        for p in paths:
            handles.append(get_module(module, p).register_forward_hook(_on_output(sums[p][li], lambda: roles[0])))
    home = next(model.parameters()).device
    model.to(device)
    try:
        with frozen(model), torch.enable_grad():
            batches = list(calib.batches(batch_size))
            for batch in tqdm(batches, desc="MBQ gradients", leave=False, disable=not progress):
                inputs = {k: v.to(device) for k, v in batch.inputs.items()}
                roles[:] = [batch.roles.to(device)]
                loss = answer_loss(model(**inputs, use_cache=False).logits, inputs["input_ids"], roles[0])
                if loss is not None:
                    loss.backward()
                del loss
    finally:
        for h in handles:
            h.remove()
        model.to(home)
    return sums


def layer_inputs_bytes(calib: CalibrationSet, n_layers: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of the layer inputs ``answer_gradients`` stores on the host: L x N x T x C x element size."""
    return n_layers * len(calib) * calib.seq_len * hidden_size * torch.empty((), dtype=dtype).element_size()


def test_layer_inputs_bytes_is_layers_by_samples_by_tokens_by_width_by_element_size():
    calib = CalibrationSet([Sample("a", {}, torch.zeros(100, dtype=torch.int8))] * 8, pad_token_id=0)
    assert layer_inputs_bytes(calib, n_layers=28, hidden_size=3584, dtype=torch.bfloat16) == 28 * 8 * 100 * 3584 * 2


class RecordedLayers(InMemoryLayers):
    """In-memory layers that note the order they are onloaded in."""

    def __init__(self, model, family) -> None:
        super().__init__(model, family)
        self.visits: list[int] = []

    def onload(self, index, device):
        self.visits.append(index)
        return super().onload(index, device)


def relative_difference(ref: dict, got: dict) -> float:
    """Largest |got - ref| / |ref| over every sum (exact zeros must stay zero); the counts must be equal."""
    assert ref.keys() == got.keys()
    worst = 0.0
    for path in ref:
        for li, (a, b) in enumerate(zip(ref[path], got[path], strict=True)):
            assert (a["n_vis"], a["n_ans"]) == (b["n_vis"], b["n_ans"]), f"layer {li} {path}"
            for key in ("vis", "ans"):
                if a[key] == 0.0:
                    assert abs(b[key]) < 1e-12, f"layer {li} {path} {key}: {b[key]} where full autograd has 0"
                else:
                    worst = max(worst, abs(b[key] - a[key]) / abs(a[key]))
    return worst


def check_equal_to_full_autograd(model, calib, batch_size: int) -> dict:
    fam = family_for(model)
    ref = full_autograd_gradients(model, fam, calib, "cpu", batch_size, progress=False)
    layers = RecordedLayers(model, fam)
    got = answer_gradients(model, fam, calib, layers, "cpu", batch_size, progress=False)
    n = len(layers)
    assert layers.visits == [*range(n - 1), *reversed(range(n))]  # up to L-2, then down from the top, once each
    assert relative_difference(ref, got) <= RTOL
    assert all(p.grad is None for p in model.parameters())
    assert fam.decoder_layers(model) is layers.modules and all(
        type(m).__name__ != "_StandIn" for m in fam.decoder_layers(model)
    )
    return got


@pytest.fixture(scope="module")
def embedded():
    return load_model_and_processor()


def test_layerwise_equals_full_autograd_on_the_embedded_model(embedded):
    model, processor = embedded
    got = check_equal_to_full_autograd(model, calibration_for(model, processor, None, n_samples=8), batch_size=4)
    assert all(s["n_vis"] > 0 and s["n_ans"] > 0 for per_layer in got.values() for s in per_layer)


def test_layerwise_on_a_model_streamed_from_disk(embedded):
    """The layers read from the checkpoint one at a time (decoder="disk") give the in-memory model's sums."""
    model, processor = embedded
    calib = calibration_for(model, processor, None, n_samples=8)
    ref = full_autograd_gradients(model, family_for(model), calib, "cpu", 4, progress=False)
    streamed, _ = load_model_and_processor(decoder="disk")
    fam = family_for(streamed)
    layers = layers_for(streamed, fam)
    assert layers.streamed
    got = answer_gradients(streamed, fam, calib, layers, "cpu", 4, progress=False)
    assert relative_difference(ref, got) <= RTOL
    assert all(p.device.type == "meta" for p in fam.decoder_layers(streamed).parameters())


def test_a_batch_without_answer_tokens_adds_nothing():
    full = calibration(4)
    samples = full.samples
    silent = [Sample(s.id, s.inputs, torch.where(s.roles == ANSWER, PROMPT, s.roles)) for s in samples[:2]]
    calib = CalibrationSet(silent + samples[2:], pad_token_id=full.pad_token_id)
    got = check_equal_to_full_autograd(tiny_llava(layers=3), calib, batch_size=2)
    answers = sum(int((s.roles == ANSWER).sum()) for s in samples[2:])
    assert all(s["n_ans"] == answers for per_layer in got.values() for s in per_layer)


def _families():
    if str(MODELS) not in sys.path:
        sys.path.insert(0, str(MODELS))
    import _families

    return _families


def family_calibration(model, proc):
    """Three samples (two chunks of two and one) with one or two images of different sizes."""
    image = _families().image
    caption = "two objects : a red circle at the top left and a blue square ."
    rows = [
        ([image(48, 48, 0), image(32, 64, 1)], "<image>\ndescribe the image.<image>", caption),
        ([image(64, 32, 2)], "<image>\ndescribe the image.", "a cross ."),
        ([image(48, 48, 3)], "<image>\nwhat is there ?", "a red circle ."),
    ]
    records = [
        (ims, {"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
        for i, (ims, q, a) in enumerate(rows)
    ]
    fam = family_for(model)
    return from_records(
        records, proc, image_token_id=fam.vision_token_id(model, proc), image_seq_length=fam.image_seq_length(model)
    )


@pytest.mark.parametrize("name", list(_families().TINY))
def test_layerwise_equals_full_autograd_on_tiny_families(name):
    model, proc = _families().build(name)
    check_equal_to_full_autograd(model, family_calibration(model, proc), batch_size=2)


def test_layerwise_equals_full_autograd_with_tuple_returning_layers():
    if str(MODELS) not in sys.path:
        sys.path.insert(0, str(MODELS))
    import test_internvl2 as internvl2

    tok = _families().tokenizer(["<IMG_CONTEXT>", "<img>", "</img>", "<|im_end|>"], eos="<|im_end|>", pad="<pad>")
    model = internvl2.toy(tok)
    assert family_for(model).layer_returns_tuple
    check_equal_to_full_autograd(model, internvl2.calibration(tok, n=3), batch_size=2)


def test_the_stored_inputs_are_layers_by_samples_by_tokens_by_width(embedded, caplog):
    model, processor = embedded
    calib = calibration_for(model, processor, None, n_samples=8)
    fam = family_for(model)
    with caplog.at_level(logging.INFO, logger=gradients.__name__):
        answer_gradients(model, fam, calib, InMemoryLayers(model, fam), "cpu", batch_size=4, progress=False)
    (held,) = [r.args[-1] for r in caplog.records if r.getMessage().startswith("MBQ gradients")]
    width = fam.decoder_layers(model)[0].input_layernorm.weight.numel()
    assert held == layer_inputs_bytes(calib, n_layers=6, hidden_size=width, dtype=torch.float32)


def test_prepare_methods_computes_the_gradients_once_for_mbq_and_mbq_weighted_gptq(monkeypatch):
    model, calib = tiny_llava(), calibration(4)
    fam = family_for(model)
    methods = [method_for(MBQConfig(wbits=3)), method_for(qig.GPTQConfig.weighted_by("mbq", wbits=3))]
    calls = []

    def counted(*args):
        calls.append(args[5])  # batch size
        return answer_gradients(*args)

    monkeypatch.setattr(gradients, "answer_gradients", counted)
    prepare_methods(model, fam, methods, calib, InMemoryLayers(model, fam), "cpu", progress=False)
    assert calls == [MBQConfig().grad_batch_size]
    assert methods[0].rho and methods[1].weighting.rho == methods[0].rho


def test_mbq_search_is_unchanged_by_the_layerwise_gradients(monkeypatch):
    """The embedded model, 16 samples, W3: every group's chosen ratio as with full autograd."""

    def ratios(use_full_autograd: bool) -> tuple[list, dict]:
        model, processor = load_model_and_processor()
        calib = calibration_for(model, processor, None, n_samples=16)
        calls = []
        layerwise = gradients.answer_gradients

        def chosen(model, family, calib, layers, device, batch_size, progress=True):
            calls.append(batch_size)
            if use_full_autograd:
                return full_autograd_gradients(model, family, calib, device, batch_size, progress)
            return layerwise(model, family, calib, layers, device, batch_size, progress)

        with monkeypatch.context() as m:
            m.setattr(gradients, "answer_gradients", chosen)
            result = qig.quantize(model, MBQConfig(wbits=3), calib, progress=False)
        assert calls == [4]  # the pipeline computed the gradients through qig.pipeline.gradients, once
        return [(g.layer, g.group, g.ratio) for g in result.groups], result.method_summary["rho"]

    full, full_rho = ratios(use_full_autograd=True)
    layer_wise, rho = ratios(use_full_autograd=False)
    assert layer_wise == full
    for path in full_rho:
        assert rho[path] == pytest.approx(full_rho[path], rel=RTOL)
