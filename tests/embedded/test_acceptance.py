"""The shipped embedded model meets its acceptance bar (slow: about two minutes on two cores).

Re-measures, on the default eval seed, what the model card and the README report:
FP accuracy >= 95%, near-chance accuracy with blank images, and plain RTN of
the decoder's linears losing at least 5 points at W3 g128 and less at W4 g128.
"""

import pytest
import torch

from qig.embedded import world
from qig.evaluate import evaluate_records, load_model_and_processor
from qig.models import family_for
from qig.quant import QuantSpec
from qig.quant.rtn import rtn_

pytestmark = pytest.mark.slow

SEED, N = 1234, 1000


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(2)
    model, processor = load_model_and_processor(None)
    records = world.generate("eval", N, SEED)
    return model, processor, records, evaluate_records(model, processor, records)["accuracy"]


def _rtn_accuracy(processor, records, spec: QuantSpec) -> float:
    model, _ = load_model_and_processor(None)
    with torch.no_grad():
        rtn_(family_for(model).decoder_linears(model), spec)
    return evaluate_records(model, processor, records)["accuracy"]


def test_fp_accuracy_at_least_95_percent(shipped):
    assert shipped[3] >= 0.95


def test_blank_images_near_chance(shipped):
    model, processor, records, _ = shipped
    blank = [(world.blank_image(SEED + i), rec) for i, (_, rec) in enumerate(records)]
    assert evaluate_records(model, processor, blank)["accuracy"] < 0.35  # majority answer per type: 30.4%


def test_rtn_w3_loses_at_least_5_points_and_w4_less(shipped):
    _, processor, records, fp = shipped
    w3 = _rtn_accuracy(processor, records, QuantSpec(3, 128))
    w4 = _rtn_accuracy(processor, records, QuantSpec(4, 128))
    assert fp - w3 >= 0.05
    assert fp - w4 < fp - w3
