"""Pictures: overlay size and grid alignment; matplotlib is optional with a clear error."""

import sys

import numpy as np
import pytest

from qig.errors import QigError
from qig.tokenmaps import render


def test_overlay_is_the_upscaled_image_with_one_cell_per_token():
    image = np.zeros((48, 48, 3), np.uint8)
    rel = np.ones((6, 6))
    rel[2, 4] = 4.0  # one hot patch
    out = render.overlay(image, rel, px=192)
    assert out.shape == (192, 192, 3) and out.dtype == np.uint8
    cell = 192 // 6
    hot = out[2 * cell + 2 : 3 * cell - 2, 4 * cell + 2 : 5 * cell - 2].reshape(-1, 3)
    cold = out[cell + 2 : 2 * cell - 2, cell + 2 : 2 * cell - 2].reshape(-1, 3)
    assert (hot == hot[0]).all() and (cold == cold[0]).all()  # flat inside a patch
    assert hot[0][0] > hot[0][2] and hot[0][0] > cold[0][0]  # red where the weight is high


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(QigError, match=r"pip install 'qig\[plot\]'"):
        render.require_matplotlib()
