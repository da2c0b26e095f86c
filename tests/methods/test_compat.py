"""The official code's choices under QIGConfig.compat(): pad positions, f_q's linears, the empty W-A path.

benchmarks/official_compare.py checks compat against the official code itself (which the project does not
ship); these tests pin down each piece on its own.
"""

import pytest
import torch
from _tiny import calibration, tiny_llava

from qig.calib import PAD, VISION
from qig.methods import AWQConfig, QIGConfig, method_for
from qig.methods.base import counted_tokens
from qig.methods.qig import lambdas
from qig.methods.search import channel_means
from qig.models import family_for
from qig.pipeline.capture import capture
from qig.pipeline.groups import group_context
from qig.pipeline.loop import _ungrouped


def test_compat_presets():
    w = QIGConfig.compat(wbits=3)
    assert (w.baseline, w.steps, w.quadrature, w.uniform_first_groups) == ("zero", 32, "riemann", 5)
    assert (w.fq_linears, w.fq_gradient, w.pad_tokens, w.clip) == ("block", "through", "count", "iqr")
    wa = QIGConfig.compat(wbits=4, abits=8, group_size=None)
    assert (wa.baseline, wa.uniform_first_groups, wa.fq_gradient, wa.clip) == ("quantized-always", 0, "none", "none")
    assert wa.reference_output == "quantized" and wa.pad_tokens == "count"
    d = QIGConfig()
    assert (d.fq_linears, d.fq_gradient, d.pad_tokens, d.baseline) == ("group", "through", "skip", "quantized")


def test_pad_tokens_count_in_the_channel_statistic():
    x = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [8.0, 0.0]]])  # [1, 3, 2]; the last position is a pad
    roles = torch.tensor([[VISION, VISION, PAD]])
    assert torch.equal(channel_means([x], [roles]), torch.tensor([2.0, 4.0]))
    assert torch.allclose(channel_means([x], [roles], "count"), torch.tensor([4.0, 8 / 3]))
    assert counted_tokens(roles, "count").all() and not counted_tokens(roles, "skip")[0, 2]


def test_dead_samples_weigh_zero_or_uniformly():
    ig = torch.zeros(1, 4, 3)
    real = torch.ones(1, 4, dtype=torch.bool)
    assert torch.equal(lambdas(ig, real, "none", "zero")[0], torch.zeros(1, 4))
    assert torch.allclose(lambdas(ig, real, "none")[0], torch.full((1, 4), 0.25))


@pytest.fixture(scope="module")
def layer0():
    model = tiny_llava(kv_heads=2)  # GQA: o_proj is in no group
    family = family_for(model)
    for p in model.parameters():
        p.requires_grad_(False)
    chunks = capture(model, family, calibration(4, seed=0), 4, torch.device("cpu"))
    return family, family.decoder_layers(model)[0], chunks


def _ctx(layer0, config, group_index):
    family, layer, chunks = layer0
    group = family.active_groups(layer)[group_index]
    return group_context(layer, group, chunks, 0, 10, config.spec, {}, True, config.act_spec)


def test_ungrouped_linears_meet_x_q_quantized(layer0):
    family, layer, _ = layer0
    ungrouped = _ungrouped(layer, family.active_groups(layer), AWQConfig(wbits=3).spec)
    assert list(ungrouped) == ["self_attn.o_proj.weight"]
    assert not torch.equal(ungrouped["self_attn.o_proj.weight"], layer.self_attn.o_proj.weight)


def test_awq_counts_pads_only_when_asked(layer0):
    ctx = _ctx(layer0, AWQConfig(wbits=3), 0)
    pads = ctx.roles[0] == PAD
    assert pads.any()
    skip = method_for(AWQConfig(wbits=3)).token_weights(ctx).weights[0]
    count = method_for(AWQConfig(wbits=3, pad_tokens="count")).token_weights(ctx).weights[0]
    assert float(skip[pads].sum()) == 0 and bool((count == 1).all())


def test_fq_linears_block_quantizes_the_whole_inspected_block(layer0):
    config = QIGConfig(wbits=3, baseline="zero", steps=2)
    ctx = _ctx(layer0, config, 0)  # q/k/v inside self_attn: block "block" adds o_proj to f_q
    assert set(ctx.block_linears) == {"q_proj", "k_proj", "v_proj", "o_proj"} and set(ctx.linears) < set(
        ctx.block_linears
    )
    group = method_for(config).token_weights(ctx).weights[0]
    block = method_for(QIGConfig(wbits=3, baseline="zero", steps=2, fq_linears="block")).token_weights(ctx)
    assert not torch.allclose(group, block.weights[0])


def test_fq_gradient_none_attributes_through_f_only(layer0):
    config = QIGConfig(wbits=4, abits=8, group_size=None, baseline="zero", steps=2)
    ctx = _ctx(layer0, config, 1)
    through = method_for(config).token_weights(ctx).weights[0]
    none = method_for(QIGConfig(wbits=4, abits=8, group_size=None, baseline="zero", steps=2, fq_gradient="none"))
    assert not torch.allclose(through, none.token_weights(ctx).weights[0])


def test_quantized_always_keeps_s_1_where_the_path_is_empty(layer0):
    config = QIGConfig.compat(wbits=4, abits=8, group_size=None)
    ctx = _ctx(layer0, config, 0)  # layer 0's first group: x^q is x
    assert all(torch.equal(a, b) for a, b in zip(ctx.x, ctx.xq, strict=True))
    method = method_for(config)
    weights = method.token_weights(ctx).weights
    assert all(float(w.abs().sum()) == 0 for w in weights)
    found = method.scales(ctx, weights)
    assert found.ratio == 0.0 and torch.equal(found.scales, torch.ones_like(found.scales))
    default = QIGConfig(wbits=4, abits=8, group_size=None)  # falls back to x' = 0 instead
    assert float(method_for(default).token_weights(ctx).weights[0].sum()) > 0


def test_uniform_phase_weighs_each_sample_alike(layer0):
    config = QIGConfig.compat(wbits=3)
    ctx = _ctx(layer0, config, 0)
    ctx.search_index = 0
    (w, *_) = method_for(config).token_weights(ctx).weights
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]))
