"""Vision tokens on the patch grid: LLaVA's single-image grid, and clear refusals otherwise."""

from types import SimpleNamespace

import pytest
import torch
from _tiny import calibration, tiny_llava

from qig.calib import VISION
from qig.errors import QigError
from qig.tokenmaps.grid import image_tokens


@pytest.fixture(scope="module")
def sample():
    return calibration(1).samples[0]


def test_llava_grid_covers_every_vision_token_once(sample):
    from _tiny import processor

    (img,) = image_tokens(tiny_llava(layers=1).config, processor(), sample.inputs, sample.roles)
    assert (img.grid.rows, img.grid.cols, img.grid.height, img.grid.width) == (6, 6, 48, 48)
    assert img.image.shape == (48, 48, 3) and img.image.dtype.name == "uint8"
    vision = torch.nonzero(sample.roles == VISION).flatten().tolist()
    assert img.positions.shape == (6, 6) and sorted(img.positions.flatten().tolist()) == vision
    assert img.positions[0, 1] == img.positions[0, 0] + 1  # row-major


def test_text_only_sample_has_no_images(sample):
    roles = torch.zeros_like(sample.roles)
    assert image_tokens(SimpleNamespace(model_type="anything"), None, {}, roles) == []


@pytest.mark.parametrize(
    ("model_type", "drop", "message"),
    [("qwen2_vl", 0, "cannot place the vision tokens of model type 'qwen2_vl'"), ("llava", 5, "tiling")],
    ids=["unknown-family", "token-count-mismatch"],
)
def test_refusals_say_why(sample, model_type, drop, message):
    from _tiny import processor

    config = tiny_llava(layers=1).config
    config.model_type = model_type
    roles = sample.roles.clone()
    roles[torch.nonzero(roles == VISION).flatten()[:drop]] = 1
    with pytest.raises(QigError, match=message):
        image_tokens(config, processor(), sample.inputs, roles)
