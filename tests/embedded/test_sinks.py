"""Massive activations on sink tokens: planted by training (scripts/train_embedded.py), held through it."""

import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch

from qig import embedded

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**kw):
    base = {"sink_tokens": "<|im_start|>,<|im_end|>", "sink_channels": "5", "sink_offset": 300.0, "sink_gain": 6.0}
    return types.SimpleNamespace(**(base | kw))


def test_the_sink_offsets_and_gains_stay_fixed_while_everything_else_trains():
    train = _script("train_embedded")
    processor = embedded.build_processor()
    tok = processor.tokenizer
    model = embedded.build_model(tok, seed=0).float().train()
    emb = model.get_input_embeddings().weight
    rows = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    before = emb.detach().clone()
    norm = model.model.language_model.layers[2].input_layernorm.weight
    norm_before = norm.detach().clone()
    fixed = train.fixed_offsets(model, tok, _args())
    assert torch.allclose(emb[rows, 5], before[rows, 5] + 300.0)
    assert torch.allclose(norm[5], norm_before[5] * 6.0)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.tensor([[rows[0], 9, 10, 11, rows[1], 12]])
    for _ in range(3):
        loss = model.model.language_model(input_ids=ids).last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert emb.grad[rows, 5].abs().max() == 0 and norm.grad[5] == 0  # masked
        opt.step()
        with torch.no_grad():
            for param, index, value in fixed:
                param[index] = value
    assert torch.equal(emb[rows, 5], (before[rows, 5] + 300.0).to(emb.dtype))
    assert norm[5] == (norm_before[5] * 6.0).to(norm.dtype)
    assert not torch.equal(emb[rows, 6], before[rows, 6])  # the rest of the same rows did train
    assert not torch.equal(norm[6], norm_before[6])


def test_sink_tokens_are_space_separated_so_that_a_comma_can_be_one():
    train = _script("train_embedded")
    assert train.sink_tokens("<|im_start|> , . :") == ["<|im_start|>", ",", ".", ":"]
    assert train.sink_tokens("<|im_start|>,<|im_end|>") == ["<|im_start|>", "<|im_end|>"]


def test_sink_tokens_the_tokenizer_does_not_know_are_refused():
    train = _script("train_embedded")
    processor = embedded.build_processor()
    model = embedded.build_model(processor.tokenizer, seed=0)
    with pytest.raises(SystemExit, match="--sink-tokens"):
        train.fixed_offsets(model, processor.tokenizer, _args(sink_tokens="<|not_a_token|>"))
    with pytest.raises(SystemExit, match="--sink-channels"):
        train.fixed_offsets(model, processor.tokenizer, _args(sink_channels=""))
    # a sink flag without the offset it shapes is refused, not ignored
    with pytest.raises(SystemExit, match="^--sink-gain given without --sink-offset"):
        train.fixed_offsets(model, processor.tokenizer, _args(sink_tokens="", sink_channels="", sink_offset=0.0))
    with pytest.raises(SystemExit, match="^--sink-tokens, --sink-channels given without --sink-offset"):
        train.fixed_offsets(model, processor.tokenizer, _args(sink_offset=0.0, sink_gain=1.0))
    with pytest.raises(SystemExit, match="--sink-offset needs --sink-tokens"):
        train.fixed_offsets(model, processor.tokenizer, _args(sink_tokens=""))
    # nothing given: nothing planted
    plain = _args(sink_tokens="", sink_channels="", sink_offset=0.0, sink_gain=1.0)
    assert train.fixed_offsets(model, processor.tokenizer, plain) == []


def _inputs(model, batch) -> dict:
    """Per decoder layer: its residual input, its q/k/v input and its down_proj input."""
    from qig.embedded.model import forward_inputs

    modules = {}
    for i, layer in enumerate(model.model.language_model.layers):
        modules[("residual", i)] = layer
        modules[("qkv", i)] = layer.self_attn.q_proj
        modules[("down", i)] = layer.mlp.down_proj
    return forward_inputs(model, batch, modules)


def test_the_shipped_sinks_model_carries_massive_activations_on_its_sink_tokens():
    from qig.calib import embedded_calibration
    from qig.evaluate import load_model_and_processor

    model, processor = load_model_and_processor(embedded.sinks_model_dir())
    batch = next(embedded_calibration(processor, n_samples=8).batches(8)).inputs
    seen = _inputs(model, batch)
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    tokens = json.loads((embedded.sinks_model_dir() / "metrics.json").read_text())["sinks"]["tokens"]
    assert {"<|im_start|>", "<|im_end|>"} <= set(tokens)
    sink = torch.isin(ids, torch.tensor(processor.tokenizer.convert_tokens_to_ids(tokens)))
    assert sink.sum() >= 2 * len(ids)

    def ratio(place, i, of):
        x = seen[(place, i)].abs()
        others = x[~sink & real]
        return x[sink & real].amax(-1).min() / (others.max() if of == "max" else others.median())

    layers = range(model.config.text_config.num_hidden_layers)
    for i in layers:  # every sink, in every layer: above any other token's largest, and >= 25x their median
        assert ratio("residual", i, "max") >= 2, i
        assert ratio("residual", i, "median") >= 25, i
    assert ratio("down", 0, "max") >= 10  # the first MLP acts on them with a massive intermediate
    assert ratio("qkv", 0, "median") >= 100
    # The default model has no such tokens: there, the same tokens are ordinary.
    default, _ = load_model_and_processor()
    seen = _inputs(default, batch)
    assert all(ratio("residual", i, "max") < 1 for i in layers)


def test_the_shipped_sinks_model_answers_like_the_default():
    from qig.embedded import world
    from qig.evaluate import evaluate_records, load_model_and_processor

    model, processor = load_model_and_processor(embedded.sinks_model_dir())
    rep = evaluate_records(model, processor, world.generate("eval", 200, 1234))
    assert rep["accuracy"] >= 0.9
