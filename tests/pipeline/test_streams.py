"""The two streams: advanced through a layer, with weight overrides on x^q, or dropped when not carried."""

import torch
from _tiny import calibration, tiny_llava

from qig.models import family_for
from qig.pipeline import capture, next_input
from qig.pipeline.streams import Streams, cat_rows


def _setup():
    model = tiny_llava(layers=2)
    fam = family_for(model)
    chunks = capture(model, fam, calibration(4), batch_size=2, device=torch.device("cpu"))
    return fam.decoder_layers(model), chunks


@torch.no_grad()
def test_both_streams_advance_and_diverge_only_under_overrides():
    layers, chunks = _setup()
    x0 = [c.x for c in chunks]
    streams = Streams(chunks)
    zero = {"mlp.down_proj.weight": torch.zeros_like(layers[0].mlp.down_proj.weight)}
    streams.advance_fp(layers[0], 0)
    streams.advance_quantized(layers[0], 0, zero)
    for c, x in zip(chunks, x0, strict=True):
        assert torch.equal(c.x, next_input(layers[0], x, c, 0))
        assert torch.equal(c.xq, next_input(layers[0], x, c, 0, zero))
        assert not torch.equal(c.x, c.xq)


@torch.no_grad()
def test_streams_not_carried_are_dropped():
    layers, chunks = _setup()
    streams = Streams(chunks, fp=False, quantized=True)
    streams.advance_fp(layers[0], 0)
    streams.advance_quantized(layers[0], 0)
    assert all(c.x is None and c.xq is not None for c in chunks)
    assert streams.roles().shape == (4, chunks[0].roles.shape[1]) and streams.roles().dtype == torch.int8


def test_cat_rows_stacks_chunks_in_order():
    rows = cat_rows([torch.zeros(2, 5), torch.ones(1, 5, dtype=torch.bfloat16)])
    assert rows.shape == (3, 5) and rows.dtype == torch.float32 and rows[2].eq(1).all()
