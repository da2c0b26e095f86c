"""Hub ids: ``--model org/name`` and ``--calib org/name`` resolved from a hub cache laid out in a temporary folder.

The cache is laid out as huggingface_hub lays it out (``models--org--name/refs/main``
holding a commit, ``snapshots/<commit>/`` holding the files); the tests run
offline (HF_HUB_OFFLINE=1, conftest), so nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _cli import run_cli
from _tiny import processor, tiny_llava
from test_calib_formats import _same

from qig.calib import EMBEDDED, calibration_for, check_calibration_source, load_calibration
from qig.embedded import world
from qig.errors import QigError
from qig.hub import looks_like_repo_id, resolve_model
from qig.runs import read_report, source_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def cached(cache: Path, kind: str, repo_id: str, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """An empty snapshot of ``repo_id`` in the cache, ``ref`` pointing at it; returns the snapshot folder."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def hub_model(hub_cache, model_dir) -> str:
    """The shared tiny LLaVA folder as the cached hub model ``org/tiny-llava``."""
    shutil.copytree(model_dir, cached(hub_cache, "model", "org/tiny-llava"), dirs_exist_ok=True)
    return "org/tiny-llava"


def test_repo_ids_and_paths_are_told_apart():
    assert looks_like_repo_id("Qwen/Qwen2.5-VL-7B-Instruct")
    assert looks_like_repo_id("gpt2")
    for path in ("./out/run", "/models/llava", "a/b/c", "../x", "out/run/", "~/m"):
        assert not looks_like_repo_id(path), path


def test_a_folder_is_itself_and_refuses_a_revision(model_dir):
    assert resolve_model(str(model_dir)).path == model_dir
    assert resolve_model(str(model_dir)).repo_id is None
    with pytest.raises(QigError, match="--revision main applies to a hub id, not to the folder"):
        resolve_model(str(model_dir), revision="main")


def test_a_hub_id_resolves_to_its_cached_snapshot_and_commit(hub_cache, hub_model):
    got = resolve_model(hub_model)
    assert got.path == hub_cache / "models--org--tiny-llava" / "snapshots" / COMMIT
    assert (got.repo_id, got.revision) == (hub_model, COMMIT)
    assert resolve_model(hub_model, revision=COMMIT).path == got.path


def test_an_uncached_id_is_one_line_naming_the_id_and_the_way_out(hub_cache):
    with pytest.raises(QigError) as err:
        resolve_model("org/not-downloaded")
    message = str(err.value)
    assert "\n" not in message
    assert "org/not-downloaded" in message and "not in the Hugging Face cache" in message
    assert "hf download org/not-downloaded" in message and "HF_HUB_OFFLINE=1" in message


def test_an_uncached_revision_names_it(hub_cache, hub_model):
    with pytest.raises(QigError, match="at revision v2 is not in the Hugging Face cache"):
        resolve_model(hub_model, revision="v2")


def test_quantize_eval_and_export_take_a_hub_id(hub_cache, hub_model, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["quantize", "--model", hub_model, "--method", "awq", "--wbits", "4", "--group-size", "64"]
    assert run_cli(*argv, "--calib", EMBEDDED, "--n-samples", 4, "--output", out, "--no-progress") == 0
    report = read_report(out)
    assert report["source_hub"] == {"repo_id": hub_model, "revision": COMMIT}
    assert report["options"]["model"] == hub_model
    assert Path(report["source_model"]) == (hub_cache / "models--org--tiny-llava" / "snapshots" / COMMIT).resolve()
    assert run_cli("eval", "--model", hub_model, "--n", 8, "--batch-size", 8) == 0
    assert "overall" in capsys.readouterr().out
    assert run_cli("eval", "--model", out, "--n", 8, "--batch-size", 8) == 0  # its reference: the hub snapshot
    assert "agreement with reference" in capsys.readouterr().out
    assert run_cli("export", "--input", out, "--output", tmp_path / "ct") == 0
    assert (tmp_path / "ct" / "config.json").is_file()


def test_a_run_whose_cached_folder_moved_finds_its_source_by_id_and_commit(hub_cache, hub_model, tmp_path):
    out = tmp_path / "run"
    assert run_cli("quantize", "--model", hub_model, "--method", "rtn", "--wbits", "4", "--output", out) == 0
    report = json.loads((out / "report.json").read_text())
    report["source_model"] = str(tmp_path / "elsewhere")  # the run folder copied to a machine with another cache
    (out / "report.json").write_text(json.dumps(report))
    assert Path(source_model(out)) == hub_cache / "models--org--tiny-llava" / "snapshots" / COMMIT


def test_the_command_line_refuses_an_uncached_id_in_one_line(hub_cache, tmp_path, capsys):
    code = run_cli("quantize", "--model", "org/missing", "--method", "rtn", "--output", tmp_path / "o")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "org/missing" in err[0] and "not in the Hugging Face cache" in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_revision_applies_to_hub_ids_only(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code = run_cli("quantize", "--model", model_dir, "--revision", "main", "--method", "rtn", "--output", out)
    assert code == 2
    assert "--revision main applies to a hub id" in capsys.readouterr().err


# ------------------------------------------------------------------ calibration: asked for, never silent


def test_a_model_that_is_not_embedded_needs_calib(model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code = run_cli("quantize", "--model", model_dir, "--method", "awq", "--wbits", "4", "--output", out)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "--calib" in err[0] and "--calib embedded" in err[0] and str(model_dir) in err[0]
    assert not out.exists() and not out.with_name("o.partial").exists()
    assert run_cli("quantize", "--model", model_dir, "--method", "rtn", "--wbits", "4", "--output", out) == 0  # rtn


def test_calib_embedded_asks_for_the_toy_world_by_name(model_dir, tmp_path):
    out = tmp_path / "o"
    argv = ["quantize", "--model", model_dir, "--method", "awq", "--wbits", "4", "--group-size", "64"]
    assert run_cli(*argv, "--calib", EMBEDDED, "--n-samples", 4, "--output", out, "--no-progress") == 0
    assert read_report(out)["n_calibration_samples"] == 4


def test_calib_embedded_takes_no_image_folder_or_split(model_dir, tmp_path, capsys):
    argv = ["quantize", "--model", model_dir, "--method", "awq", "--calib", EMBEDDED, "--output", tmp_path / "o"]
    assert run_cli(*argv, "--calib-split", "train") == 2
    assert "--calib-split goes with a hub dataset id" in capsys.readouterr().err
    assert run_cli(*argv, "--image-folder", tmp_path) == 2
    assert "--image-folder goes with a calibration file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_embedded_models_keep_their_world_as_default():
    from qig.embedded import default_model_dir, sinks_model_dir

    check_calibration_source(None, None)
    check_calibration_source(str(default_model_dir()), None)
    check_calibration_source(str(sinks_model_dir()), None)


def test_the_library_refuses_a_model_built_elsewhere_without_data():
    model = tiny_llava()
    with pytest.raises(QigError, match="--calib embedded"):
        calibration_for(model, processor(), n_samples=2)
    assert len(calibration_for(model, processor(), EMBEDDED, n_samples=2)) == 2


# ------------------------------------------------------------------ hub datasets


def _rows(split: Path) -> list[dict]:
    return json.loads(split.read_text())


def _parquet_rows(split: Path, rows: list[dict], path: Path, captions: str = "one") -> None:
    """The rows as a hub dataset's parquet file: image bytes (datasets' Image struct) and a caption (or a list)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    answers = [r["conversations"][1]["value"] for r in rows]
    table = pa.table(
        {
            "image": [{"bytes": (split.parent / r["image"]).read_bytes(), "path": None} for r in rows],
            "caption": answers if captions == "one" else [[a, "another caption ."] for a in answers],
            "id": [r["id"] for r in rows],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


@pytest.fixture
def split(tmp_path) -> Path:
    return world.write_split("calib", tmp_path / "split", n=6, seed=0)


@pytest.mark.parametrize("captions", ["one", "flickr30k-list"])
def test_a_hub_dataset_calibrates_as_the_same_rows_in_json(hub_cache, split, captions):
    rows = _rows(split)
    snapshot = cached(hub_cache, "dataset", "org/captions")
    _parquet_rows(split, rows[:3], snapshot / "data" / "test-00000-of-00002.parquet", captions)
    _parquet_rows(split, rows[3:], snapshot / "data" / "test-00001-of-00002.parquet", captions)
    from_hub = load_calibration("org/captions", processor(), n_samples=6, seed=2, image_seq_length=36)
    _same(from_hub, load_calibration(split, processor(), n_samples=6, seed=2, image_seq_length=36))


def test_a_hub_dataset_with_several_splits_needs_one_named(hub_cache, split):
    rows = _rows(split)
    snapshot = cached(hub_cache, "dataset", "org/two-splits")
    _parquet_rows(split, rows[:3], snapshot / "train.parquet")
    _parquet_rows(split, rows[3:], snapshot / "validation.parquet")
    with pytest.raises(QigError, match="has the splits train, validation; choose one with --calib-split"):
        load_calibration("org/two-splits", processor(), n_samples=2)
    with pytest.raises(QigError, match="has no split 'test'; its splits: train, validation"):
        load_calibration("org/two-splits", processor(), n_samples=2, split="test")
    got = load_calibration("org/two-splits", processor(), n_samples=3, split="validation", image_seq_length=36)
    assert sorted(s.id for s in got.samples) == sorted(r["id"] for r in rows[3:])


def test_an_uncached_dataset_is_one_line_naming_it(hub_cache):
    with pytest.raises(QigError, match="dataset org/nothing is not in the Hugging Face cache.*--repo-type dataset"):
        load_calibration("org/nothing", processor(), n_samples=2)


def test_quantize_calibrates_from_a_hub_dataset(hub_cache, split, model_dir, tmp_path):
    _parquet_rows(split, _rows(split), cached(hub_cache, "dataset", "org/caps") / "train.parquet")
    out = tmp_path / "o"
    argv = ["quantize", "--model", model_dir, "--method", "awq", "--wbits", "4", "--group-size", "64"]
    assert run_cli(*argv, "--calib", "org/caps", "--n-samples", 4, "--output", out, "--no-progress") == 0
    assert read_report(out)["n_calibration_samples"] == 4
    code = run_cli(*argv, "--calib", split, "--calib-split", "train", "--output", tmp_path / "p")
    assert code == 2  # a split names a part of a hub dataset, not of a file


def test_the_lmms_eval_model_takes_a_hub_id_and_revision(hub_cache, hub_model):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (docs/lmms-eval.md)")
    from qig.lmms.model import QigModel

    lm = QigModel(pretrained=hub_model, revision=COMMIT, batch_size=2)
    assert lm.model.name_or_path == str(hub_cache / "models--org--tiny-llava" / "snapshots" / COMMIT)
    with pytest.raises(QigError, match="not in the Hugging Face cache"):
        QigModel(pretrained=hub_model, revision=OTHER)


def test_plan_takes_a_hub_id(hub_cache, capsys):
    fixture = Path(__file__).resolve().parent / "fixtures" / "real_configs" / "qwen2-vl-7b-instruct"
    shutil.copytree(fixture, cached(hub_cache, "model", "Qwen/Qwen2-VL-7B-Instruct"), dirs_exist_ok=True)
    argv = ["plan", "--model", "Qwen/Qwen2-VL-7B-Instruct", "--method", "awq", "--wbits", 4, "--group-size", 128]
    assert run_cli(*argv) == 0
    assert "Qwen2VLForConditionalGeneration" in capsys.readouterr().out
    assert run_cli("plan", "--model", "Qwen/not-cached", "--method", "rtn") == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err
