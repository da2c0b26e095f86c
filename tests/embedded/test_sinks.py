"""Massive activations on sink tokens: planted by training (scripts/train_embedded.py), held through it."""

import importlib.util
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


def test_sink_tokens_the_tokenizer_does_not_know_are_refused():
    train = _script("train_embedded")
    processor = embedded.build_processor()
    model = embedded.build_model(processor.tokenizer, seed=0)
    with pytest.raises(SystemExit, match="--sink-tokens"):
        train.fixed_offsets(model, processor.tokenizer, _args(sink_tokens="<|not_a_token|>"))
    with pytest.raises(SystemExit, match="--sink-channels"):
        train.fixed_offsets(model, processor.tokenizer, _args(sink_channels=""))
