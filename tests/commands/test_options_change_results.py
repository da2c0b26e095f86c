"""Every method option ``qig quantize`` accepts changes what the run writes (the every-flag test's other half).

Per method, one run with its defaults and one per option set to another valid
value (``test_quantize_options.VALUES``, with what it needs), on a tiny model
with outlier channels and four calibration captions; what a run writes is its
quantized weights, its search result and the search's records (search.json
less its timings). Even the options that only split the work (samples per
forward, a token budget, MBQ's gradient batch) change it: they change the
order of float sums, and with it the bits. So no accepted option is inert.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from _tiny import processor, tiny_llava
from test_quantize_options import NEEDS, OWN_VALUES, VALUES

import qig
from qig.calib import EMBEDDED, calibration_for
from qig.methods import CONFIGS
from qig.methods.config import config_from_options, options_of

BASE = {"smoothquant": {"wbits": 8, "abits": 8}, "qig": {}, "mbq": {}, "awq": {}, "gptq": {}, "rtn": {}}
OTHER = {"batch_tokens": 64}  # a budget that cuts this toy's batch (test_quantize_options' 4096 does not)


def _digest(model: torch.nn.Module, result) -> str:
    h = hashlib.sha256()
    for tensors in (model.state_dict(), result.tensors()):
        for k in sorted(tensors):
            t = tensors[k].detach().contiguous().cpu()
            h.update(k.encode() + t.view(torch.uint8).numpy().tobytes())
    records = result.to_json()
    for group in records["groups"]:
        group.pop("seconds", None)  # timings differ from run to run
    records.get("method_summary", {}).get("gptq", {}).pop("seconds_per_layer", None)
    h.update(json.dumps(records, sort_keys=True, default=str).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world():
    model = tiny_llava(outliers=True, layers=1)
    calib = calibration_for(model, processor(), EMBEDDED, n_samples=4)
    return model, calib, {}


def _run(world, method: str, options: dict) -> str:
    model, calib, cache = world
    key = (method, tuple(sorted((k, str(v)) for k, v in options.items())))
    if key not in cache:
        config = config_from_options(method, options)
        m = copy.deepcopy(model)
        result = qig.quantize(m, config, calib, progress=False)
        cache[key] = _digest(m, result)
    return cache[key]


CASES = [
    (m, k)
    for m in BASE
    for k in [*options_of(CONFIGS[m]), *CONFIGS[m].presets]
    if not (m == "smoothquant" and k in ("group_size", "abits", "wbits"))  # W-A only: its BASE sets them
    and not (m == "gptq" and k == "abits")  # GPTQ is weight-only
]


@pytest.mark.parametrize(("method", "key"), CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_an_accepted_option_changes_what_the_run_writes(world, method, key):
    cls = CONFIGS[method]
    needs = {k: v for k, v in NEEDS.get(key, {}).items() if k in options_of(cls)}
    base = {**BASE[method], **needs}
    changed = {**base, key: OTHER.get(key, OWN_VALUES.get((method, key), VALUES[key]))}
    if key == "abits":  # W-A: per-channel weights
        changed["group_size"] = None
    assert _run(world, method, changed) != _run(world, method, base), (
        f"{method} --{key} {changed[key]!r} writes the same as without it"
    )
