"""Run folders: where the run files are, the source model a report records, and clear errors."""

import json

import pytest

import qig
from qig.embedded import default_model_dir
from qig.errors import QigError
from qig.runs import (
    REPORT_JSON,
    RUN_SUBDIR,
    SEARCH_JSON,
    read_report,
    read_search_config,
    run_file,
    source_model,
)


def _run(folder, report=None, search=None):
    folder.mkdir(parents=True, exist_ok=True)
    if report is not None:
        (folder / REPORT_JSON).write_text(json.dumps(report))
    if search is not None:
        (folder / SEARCH_JSON).write_text(json.dumps(search))
    return folder


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ({"source_model": "/models/llava", "options": {"model": "elsewhere"}}, "/models/llava"),
        ({"options": {"model": "models/llava"}}, "models/llava"),
        ({"source_model": None}, str(default_model_dir())),
        ({"options": {"model": None}}, str(default_model_dir())),
        ({"config": {"method": "rtn"}}, None),
    ],
    ids=["source-model-first", "older-report-options", "embedded", "older-embedded", "no-model-recorded"],
)
def test_source_model(tmp_path, report, expected):
    assert source_model(_run(tmp_path / "run", report)) == expected


def test_a_folder_without_report_is_not_a_run(tmp_path):
    assert read_report(tmp_path) is None
    assert source_model(tmp_path) is None
    assert read_search_config(tmp_path) is None


def test_an_exported_folder_keeps_the_run_files_in_its_subfolder(tmp_path):
    _run(tmp_path / RUN_SUBDIR, {"source_model": "/models/x"}, {"config": {"method": "rtn", "wbits": 4}})
    assert run_file(tmp_path, REPORT_JSON) == tmp_path / RUN_SUBDIR / REPORT_JSON
    assert read_report(tmp_path)["source_model"] == "/models/x"
    assert source_model(tmp_path) == "/models/x"
    assert read_search_config(tmp_path) == {"method": "rtn", "wbits": 4}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (REPORT_JSON, "{not json", "report.json is not valid JSON"),
        (REPORT_JSON, "[1, 2]", "holds a JSON list, not an object"),
        (REPORT_JSON, '{"source_model": 3}', "source model must be a folder path or null, got 3"),
        (SEARCH_JSON, '{"config": {"wbits": 4}}', "holds no run config with a 'method'"),
    ],
    ids=["report-not-json", "report-not-an-object", "source-not-a-path", "search-without-method"],
)
def test_bad_run_files_name_the_problem(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(QigError, match=message):
        source_model(tmp_path) if name == REPORT_JSON else read_search_config(tmp_path)


def test_the_run_folder_has_one_home():
    import qig
    import qig.api
    import qig.runs

    assert qig.load_scales is qig.api.load_scales is qig.runs.load_scales
    for name in ("SEARCH_TENSORS", "SEARCH_JSON", "REPORT_JSON", "write_output", "config_from_dict"):
        assert not hasattr(qig.api, name)  # read from qig.runs, not from a copy


def _scales_file(folder, tensors):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "search.safetensors")
    return folder / "search.safetensors"


def test_saved_scales_load_with_the_other_entries_ignored(tmp_path):
    import torch

    from qig.runs import load_scales

    good = {"scales.0.attn_in": torch.ones(8), "scales.12.mlp_out": torch.full((4,), 0.5)}
    path = _scales_file(tmp_path, {**good, "token_weights.0.attn_in": torch.zeros(2, 3), "roles": torch.zeros(2, 3)})
    scales, config = load_scales(tmp_path)  # the folder finds its search.safetensors
    assert sorted(scales) == [(0, "attn_in"), (12, "mlp_out")] and config is None
    assert torch.equal(scales[(12, "mlp_out")], good["scales.12.mlp_out"])
    assert load_scales(path)[0].keys() == scales.keys()


def _bad_scales():
    import torch

    nan, inf = float("nan"), float("inf")
    one = torch.ones(8)
    return [
        ({"scales.3.mlp_in": torch.tensor([1.0, nan, 2.0])}, "layer 3 mlp_in: 1 of its 3 scales are NaN or inf"),
        ({"scales.3.mlp_in": torch.tensor([inf, 1.0])}, "layer 3 mlp_in: 1 of its 2 scales are NaN or inf"),
        ({"scales.0.attn_in": torch.zeros(8)}, "layer 0 attn_in: 8 of its 8 scales are zero or negative"),
        ({"scales.1.attn_out": torch.tensor([1.0, -2.0])}, "layer 1 attn_out: 1 of its 2 scales are zero or negative"),
        ({"scales.0.attn_in": torch.ones(2, 4)}, r"scales.0.attn_in must be a 1-D tensor, .* got shape \[2, 4\]"),
        ({"scales.0.attn_in": torch.tensor(2.0)}, r"scales.0.attn_in must be a 1-D tensor, .* got shape \[\]"),
        ({"scales.0.attn_in": torch.ones(0)}, r"scales.0.attn_in must be a 1-D tensor, .* got shape \[0\]"),
        ({"scales.abc.attn_in": one}, r"key 'scales.abc.attn_in' is not scales.<layer>.<group> \(e.g. scales.0"),
        ({"scales.0.attn_in": torch.ones(8, dtype=torch.int64)}, "scales.0.attn_in must hold floating-point scales"),
        ({"scales.0": one}, "key 'scales.0' is not scales.<layer>.<group>"),
        ({"scales.\u0663.attn_in": one}, "key 'scales.\u0663.attn_in' is not scales.<layer>.<group>"),
        ({"scales.0.v.o": one}, "key 'scales.0.v.o' is not scales.<layer>.<group>"),
        ({"scales.-1.attn_in": one}, "key 'scales.-1.attn_in' is not scales.<layer>.<group>"),
        ({"scales.0.": one}, "key 'scales.0.' is not scales.<layer>.<group>"),
        ({"scales.0.attn_in": one, "scales.00.attn_in": one.clone()}, "two keys name layer 0 attn_in"),
        ({"token_weights.0.attn_in": one}, "holds no 'scales.<layer>.<group>' tensors"),
    ]


@pytest.mark.parametrize(
    ("tensors", "message"),
    _bad_scales(),
    ids=[
        "nan",
        "inf",
        "zero",
        "negative",
        "two-dims",
        "scalar",
        "empty",
        "layer-not-an-int",
        "integers",
        "no-group",
        "non-ascii-digit",
        "dotted-group",
        "negative-layer",
        "empty-group",
        "one-group-twice",
        "no-scales",
    ],
)
def test_bad_saved_scales_are_refused_naming_the_key_or_group(tmp_path, tensors, message):
    from qig.runs import load_scales

    path = _scales_file(tmp_path, tensors)
    with pytest.raises(QigError, match=message) as caught:
        load_scales(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def _result_and_model():
    from _tiny import tiny_llava

    model = tiny_llava()
    result = qig.quantize(model, qig.RTNConfig(wbits=4, group_size=32), progress=False)
    return model, result


def _nan_in_vision_tower(model, result, report):
    model.model.vision_tower.head.mlp.fc2.bias.data[0] = float("nan")
    return "quantized model's tensor model.vision_tower.head.mlp.fc2.bias holds NaN or inf"


def _nan_in_quantizer_scale(model, result, report):
    result.quantized["1.mlp.up_proj"]["scale"][0, 0] = float("inf")
    return "search result's quantized.1.mlp.up_proj.scale holds NaN or inf"


def _nan_loss(model, result, report):
    result.groups.append(qig.pipeline.GroupRecord(layer=0, group="attn_in", scales=None, loss_after=float("nan")))
    return r"search.json's groups\[0\].loss_after is NaN or inf"


def _nan_timing(model, result, report):
    report["timings"] = {"load": float("inf")}
    return "report.json's timings.load is NaN or inf"


@pytest.mark.parametrize(
    "corrupt",
    [_nan_in_vision_tower, _nan_in_quantizer_scale, _nan_loss, _nan_timing],
    ids=["model-tensor", "search-tensor", "search-json-number", "report-number"],
)
def test_write_output_writes_nothing_non_finite(tmp_path, corrupt):
    from qig.runs import write_output

    model, result = _result_and_model()
    report = {"config": result.config.to_dict()}
    message = corrupt(model, result, report)
    out = tmp_path / "run"
    with pytest.raises(QigError, match=message) as caught:
        write_output(out, model, None, result, report)
    assert f"nothing was written to {out}" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling
