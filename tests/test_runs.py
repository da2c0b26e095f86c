"""Run folders: where the run files are, the source model a report records, and clear errors."""

import json

import pytest

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
