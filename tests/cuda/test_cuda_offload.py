"""On the device: what waits on the host gives the resident bits, a streamed eval the in-memory answers (-m cuda).

The offloaded copies are pinned host memory brought over with ``non_blocking`` copies
(``qig.hostmem``), a path only a GPU takes; on the CPU the same tests
(``tests/pipeline/test_streaming.py``, ``tests/test_evaluate.py``) cover the logic.
``QIG_TEST_DEVICE`` picks the device as in ``test_cuda_matches_cpu.py``.
"""

import os

import pytest
import torch
from _tensors import same

import qig
from qig.calib import calibration_for
from qig.evaluate import eval_split, evaluate_records, load_for_eval
from qig.loading import load_model_and_processor
from qig.methods.config import make_config

DEVICE = os.environ.get("QIG_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason="CUDA is not available (QIG_TEST_DEVICE=cpu runs these on the CPU)",
    ),
]


@pytest.mark.parametrize(
    "method, options",
    [("awq", dict(wbits=3, n_grid=5)), ("qig", dict(wbits=4, abits=8, group_size=None, n_grid=5))],
    ids=["awq", "qig-w4a8"],
)
def test_streams_and_group_inputs_on_the_host_give_the_resident_bits(method, options):
    results = {}
    for offload in ("none", "cpu"):
        model, processor = load_model_and_processor()
        calib = calibration_for(model, processor, None, n_samples=8)
        config = make_config(method, batch_size=2, **options)
        result = qig.quantize(model, config, calib, device=DEVICE, progress=False, offload_streams=offload)
        results[offload] = (result.tensors(), model.state_dict())
    assert same(results["none"][0], results["cpu"][0])
    assert same(results["none"][1], results["cpu"][1])


def test_a_decoder_read_from_disk_answers_as_in_memory():
    records = eval_split(limit=16)
    reference = load_for_eval(None, DEVICE)  # in memory: the log-probs both are compared with
    reports = {}
    for offload in ("none", "disk"):
        model, processor = load_for_eval(None, DEVICE, offload)
        reports[offload] = evaluate_records(model, processor, records, batch_size=8, reference=reference)
    assert reports["disk"]["predictions"] == reports["none"]["predictions"]
    assert reports["disk"]["fidelity"] == reports["none"]["fidelity"]
