"""Statistics of token maps: times-uniform weights, entropy relative to uniform, shares."""

import math

import pytest
import torch

from qig.calib import ANSWER, PAD, PROMPT, VISION
from qig.tokenmaps.maps import TokenMaps, kl_from_uniform_bits, relative_entropy, relative_to_uniform


def test_entropy_is_one_for_uniform_and_zero_for_one_token():
    mask = torch.tensor([True, True, True, True, False])
    assert relative_entropy(torch.tensor([1.0, 1, 1, 1, 9]), mask) == pytest.approx(1.0)
    assert relative_entropy(torch.tensor([0.0, 5, 0, 0, 9]), mask) == pytest.approx(0.0)
    assert 0 < relative_entropy(torch.tensor([1.0, 2, 3, 4, 0]), mask) < 1
    assert kl_from_uniform_bits(torch.tensor([0.0, 5, 0, 0, 9]), mask) == pytest.approx(math.log2(4))


def test_relative_to_uniform_is_one_for_awq_and_zero_on_pad():
    real = torch.tensor([[True, True, False]])
    assert relative_to_uniform(torch.tensor([[2.0, 2.0, 0.0]]), real).tolist() == [[1.0, 1.0, 0.0]]
    assert relative_to_uniform(torch.tensor([[3.0, 1.0, 7.0]]), real).tolist() == [[1.5, 0.5, 0.0]]


def test_shares_sum_to_one_and_spread_has_every_role():
    roles = torch.tensor([[PROMPT, VISION, VISION, ANSWER, PAD]], dtype=torch.int8)
    w = torch.tensor([[0.1, 0.2, 0.4, 0.3, 0.0]])
    maps = TokenMaps(
        weights={("qig", 0, "attn_in"): w},
        roles=roles,
        input_ids=torch.zeros(1, 5, dtype=torch.long),
        tokens=[["a"] * 5],
        images=[[]],
        meta=[{"id": "s"}],
        layers=[0],
        shown=[0],
        groups=["attn_in"],
        methods=["qig"],
    )
    shares = maps.shares()["qig"]["0.attn_in"]
    assert shares == pytest.approx({"vision": 0.6, "prompt": 0.1, "answer": 0.3})
    assert set(maps.spread()["qig"]["0.attn_in"]) == {"vision", "prompt", "answer"}
    entropy = maps.entropy()[0]["qig"]["0.attn_in"]
    assert entropy["vision"] == pytest.approx(relative_entropy(torch.tensor([0.2, 0.4]), torch.tensor([True, True])))
    assert maps.to_json()["samples"][0]["roles"] == ["prompt", "vision", "vision", "answer"]
