"""Massive activations on a few vision tokens (``tiny-lvlm-vsinks``): planted by training, held through it."""

import json
import types

import pytest
import torch
from test_sinks import _inputs, _script

from qig import embedded

PATCHES = [7, 28]


def _args(**kw):
    base = {"sink_tokens": "", "sink_patches": "7,28", "sink_channels": "5", "sink_offset": 300.0, "sink_gain": 6.0}
    base |= {"sink_vision_channel": 3, "sink_vision_offset": 20.0}
    return types.SimpleNamespace(**(base | kw))


def _batch(processor, n: int = 4) -> dict:
    from qig.calib import embedded_calibration

    return next(embedded_calibration(processor, n_samples=n).batches(n)).inputs


def _sink_mask(model, batch) -> torch.Tensor:
    image = batch["input_ids"] == model.config.image_token_id  # [B, T]
    patch = image.long().cumsum(-1) - 1
    return image & torch.isin(patch % 36, torch.tensor(PATCHES))


def test_the_vision_sink_weights_stay_fixed_and_flag_only_the_sink_patches():
    train = _script("train_embedded")
    processor = embedded.build_processor()
    model = embedded.build_model(processor.tokenizer, seed=0).float().train()
    fixed = train.fixed_offsets(model, processor.tokenizer, _args())
    batch = _batch(processor)
    projected = {}
    model.model.multi_modal_projector.register_forward_hook(lambda _m, _a, out: projected.__setitem__("x", out))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    held = [(p, i, v.clone()) for p, i, v in fixed]
    for _ in range(2):
        loss = model(**batch).logits.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for param, index, value in fixed:
                param[index] = value
    assert all(torch.equal(p[i], v) for p, i, v in held)
    with torch.no_grad():
        model(**batch)
    x = projected["x"].reshape(len(batch["input_ids"]), 36, -1)  # [B, 36, H]
    sink = torch.zeros(36, dtype=torch.bool)
    sink[PATCHES] = True
    assert bool((x[:, sink, 5] > 250).all())  # about the offset on the sink patches, in every image
    assert float(x[:, ~sink, 5].abs().max()) < 30  # ordinary elsewhere


def test_a_continued_run_holds_the_sinks_of_its_checkpoint_without_planting_them_again():
    train = _script("train_embedded")
    processor = embedded.build_processor()
    model = embedded.build_model(processor.tokenizer, seed=0).float()
    first = train.fixed_offsets(model, processor.tokenizer, _args())  # the run that planted them
    state = {k: v.clone() for k, v in model.state_dict().items()}
    again = train.fixed_offsets(model, processor.tokenizer, _args(sinks_planted=True))  # --init that checkpoint
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the norms are not x6 again
    assert len(again) == len(first)  # the same entries held, at the checkpoint's values
    assert all(torch.equal(a[2], b[2]) for a, b in zip(again, first, strict=True))
    norm = model.model.language_model.layers[0].input_layernorm.weight
    train.fixed_offsets(model, processor.tokenizer, _args())  # without the flag: planted twice
    assert torch.allclose(norm[5], 6 * state["model.language_model.layers.0.input_layernorm.weight"][5])


def test_vision_and_text_sinks_together_are_refused():
    train = _script("train_embedded")
    processor = embedded.build_processor()
    model = embedded.build_model(processor.tokenizer, seed=0)
    with pytest.raises(SystemExit, match="--sink-tokens and --sink-patches"):
        train.fixed_offsets(model, processor.tokenizer, _args(sink_tokens="<|im_start|>"))


def test_the_shipped_vsinks_model_carries_massive_activations_on_its_sink_patches():
    from qig.loading import load_model_and_processor

    model, processor = load_model_and_processor(embedded.vsinks_model_dir())
    metrics = json.loads((embedded.vsinks_model_dir() / "metrics.json").read_text())
    assert metrics["sinks"]["sink_patches"] == ",".join(map(str, PATCHES))
    batch = _batch(processor, 8)
    seen = _inputs(model, batch)
    sink, real = _sink_mask(model, batch), batch["attention_mask"].bool()
    assert int(sink.sum()) == 2 * 8
    image = batch["input_ids"] == model.config.image_token_id

    def ratio(place, i, of, others=None):
        x = seen[(place, i)].abs()
        rest = x[(~sink & real) if others is None else others]
        return x[sink].amax(-1).min() / (rest.max() if of == "max" else rest.median())

    # Layer 0 carries the offset itself; its MLP then cuts the sinks' residual about 7x (the model learned to damp
    # what it cannot change), and the norms' gain keeps them massive where the linears read them (q/k/v inputs).
    assert ratio("residual", 0, "median") >= 1000 and ratio("residual", 0, "max") >= 10
    for i in range(model.config.text_config.num_hidden_layers):  # every sink patch, in every layer
        assert ratio("residual", i, "max") >= 1.2, i  # above any other token's largest |x|, text or vision
        assert ratio("residual", i, "median") >= 10, i
        assert ratio("residual", i, "max", image & ~sink) >= 1.2, i  # and above every other vision token
        assert ratio("qkv", i, "median") >= 25, i  # at the q/k/v projections' input
    assert ratio("qkv", 0, "median") >= 100
    default, _ = load_model_and_processor()  # the default model: the same patches are ordinary
    seen = _inputs(default, batch)
    assert all(ratio("residual", i, "max") < 1 for i in range(model.config.text_config.num_hidden_layers))


@pytest.fixture(scope="module")
def fp_accuracy() -> float:
    from qig.embedded import world
    from qig.evaluate import evaluate_records
    from qig.loading import load_model_and_processor

    model, processor = load_model_and_processor(embedded.vsinks_model_dir())
    return evaluate_records(model, processor, world.generate("eval", 200, 1234))["accuracy"]


def test_the_shipped_vsinks_model_answers_the_questions(fp_accuracy):
    assert fp_accuracy >= 0.85  # blank images: 26%, the majority answer per type: 30% (its model card)


def test_the_shipped_vsinks_model_answers_like_the_default(fp_accuracy):
    assert fp_accuracy >= 0.9  # issue 30's acceptance, on 200 questions
