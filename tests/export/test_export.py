"""``qig export``: compressed-tensors and fake-quant checkpoints of a quantize run (qig.export.writer)."""

import json

import pytest
import torch
from _cli import run_cli
from _tiny import calibration
from safetensors import safe_open

from qig.quant.spec import decode

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402


@pytest.fixture(scope="module")
def awq_run(tmp_path_factory):
    """The embedded model quantized by AWQ at W4A16 g128 (scales folded into the weights), saved in float32.

    float32: the loaded export (codes times float32 scales) equals it bit for bit. The default (float16, the
    source's dtype) rounds each fake-quant weight to float16; test_a_float16_run_exports_its_weights covers it.
    """
    out = tmp_path_factory.mktemp("awq") / "w4"
    code = run_cli("quantize", "--method", "awq", "--wbits", 4, "--group-size", 128, "--n-samples", 8,
                   "--batch-size", 8, "--n-grid", 5, "--dtype", "float32", "--no-progress",
                   "--output", out)  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def awq_ct(awq_run):
    out = awq_run.parent / "w4-ct"
    assert run_cli("export", "--input", awq_run, "--output", out) == 0
    return out


def _load(path, dtype=torch.float32):
    """The folder loaded by transformers in ``dtype``.

    ``.to(dtype)``: transformers 5.19 with compressed-tensors 0.17 (vLLM 0.32's pins; the round trip runs there too,
    scripts/check_vllm.sh) leaves an asymmetric pack's unquantized parts in the checkpoint's float16 whatever dtype
    is asked, and the forward then fails on mixed dtypes; 5.24 with 0.20 loads it in ``dtype`` already.
    """
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
    return model if dtype == "auto" else model.to(dtype)


def _logits(model):
    batch = next(calibration(4, seed=3).batches(4))
    with torch.no_grad():
        return model(**batch.inputs).logits


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_transformers_loads_the_export_with_the_fake_quant_logits(awq_run, awq_ct):
    fake, export = _load(awq_run), _load(awq_ct)
    torch.testing.assert_close(_logits(export), _logits(fake), rtol=1e-5, atol=1e-5)
    # the loaded weights are the fake-quant weights, bit for bit (compressed-tensors 0.17 also keeps the
    # quantization parameters on the decompressed modules; 0.20 drops them)
    a, b = fake.state_dict(), export.state_dict()
    assert set(a) <= set(b) and all(k.rsplit(".", 1)[1].startswith("weight_") for k in set(b) - set(a))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_float16_run_exports_its_weights(tmp_path):
    """The default run of the embedded model is float16 (its source's dtype): the export's codes times its float32
    scales, loaded in float32, round to exactly those float16 weights."""
    run, out = tmp_path / "rtn", tmp_path / "rtn-ct"
    assert run_cli("quantize", "--method", "rtn", "--wbits", 4, "--group-size", 128, "--output", run) == 0
    assert run_cli("export", "--input", run, "--output", out) == 0
    fake, export = _load(run, dtype="auto"), _load(out)
    a, b = fake.state_dict(), export.state_dict()
    assert a["model.language_model.layers.0.mlp.down_proj.weight"].dtype == torch.float16
    assert [k for k in a if not torch.equal(b[k].to(a[k].dtype), a[k])] == []
    torch.testing.assert_close(_logits(export), _logits(_load(run)), rtol=1e-2, atol=1e-2)


def test_packed_integers_unpacked_and_dequantized_equal_the_fake_quant_weights(awq_run, awq_ct):
    fake, packed = _tensors(awq_run), _tensors(awq_ct)
    linears = sorted(k[: -len(".weight_packed")] for k in packed if k.endswith(".weight_packed"))
    assert len(linears) == 6 * 7 and all(".layers." in n for n in linears)  # 6 decoder layers x 7 linears
    for name in linears:
        shape = tuple(packed[f"{name}.weight_shape"].tolist())
        scale = packed[f"{name}.weight_scale"]  # [out, n_groups]
        q = unpack_from_int32(packed[f"{name}.weight_packed"], 4, shape)  # [out, in] int8
        zero = unpack_from_int32(packed[f"{name}.weight_zero_point"], 4, scale.shape, packed_dim=0)
        w = decode(q.reshape(-1, 128), scale.reshape(-1, 1), zero.reshape(-1, 1).float()).reshape(shape)
        assert torch.equal(w.to(fake[f"{name}.weight"].dtype), fake[f"{name}.weight"]), name


def test_eval_on_the_export_gives_the_fake_quant_answers(awq_run, awq_ct):
    from qig.evaluate import run_eval

    fake = run_eval(model_dir=awq_run, limit=40)
    export = run_eval(model_dir=awq_ct, limit=40)
    assert export["accuracy"] == fake["accuracy"]
    assert [r["prediction"] for r in export["predictions"]] == [r["prediction"] for r in fake["predictions"]]


# vLLM 0.32's LlavaForConditionalGeneration.hf_to_vllm_mapper (vllm/model_executor/models/llava.py): checkpoint
# names -> vLLM's module names. qig saves LLaVA's legacy layout, which it leaves as it is.
VLLM_LLAVA_PREFIXES = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}


def _vllm_name(name: str) -> str:
    for old, new in VLLM_LLAVA_PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def test_config_ignore_list_and_files(awq_run, awq_ct):
    from qig.models.family import ignore_matches

    config = json.loads((awq_ct / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"], weights["symmetric"]) == (
        4,
        128,
        "group",
        False,
    )
    assert qc["config_groups"]["group_0"]["input_activations"] is None
    # llm-compressor's regexes for LLaVA: they match every kept linear as transformers names it in memory, as the
    # checkpoint names it and as vLLM names it; no decoder linear in any of these names.
    ignore = qc["ignore"]
    assert ignore == ["re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*lm_head"]
    ignored = lambda name: any(ignore_matches(entry, name) for entry in ignore)  # noqa: E731
    fake = _load(awq_run)
    linears = [n for n, m in fake.named_modules() if isinstance(m, torch.nn.Linear)]
    decoder = [n for n in linears if "language_model.layers" in n]
    kept = [n for n in linears if n not in decoder]
    assert any("vision_tower" in n for n in kept) and any("projector" in n for n in kept) and "lm_head" in kept
    saved = sorted({k.rsplit(".", 1)[0] for k in _tensors(awq_ct)})
    saved_decoder = [n for n in saved if n.startswith("language_model.model.layers.")]
    saved_kept = [n for n in saved if n not in saved_decoder and "norm" not in n and "embed_tokens" not in n]
    assert "language_model.lm_head" in saved_kept and "multi_modal_projector.linear_1" in saved_kept
    assert "vision_tower.vision_model.encoder.layers.0.mlp.fc1" in saved_kept  # vLLM's SigLIP names
    for names, want in ((kept, True), (saved_kept, True), (decoder, False), (saved_decoder, False)):
        for name in names:
            assert ignored(name) is want and ignored(_vllm_name(name)) is want, name
    for name in ("chat_template.jinja", "processor_config.json", "tokenizer.json", "qig/search.json"):
        assert (awq_ct / name).is_file(), name
    # loaders glob *.safetensors at the top level: only the model may be there
    assert sorted(p.name for p in awq_ct.glob("*.safetensors")) == ["model.safetensors"]


def test_w4_g128_export_is_at_most_030_of_fp16(awq_ct):
    from qig.export.size import linear_bytes

    stored, fp16 = linear_bytes(awq_ct)
    assert fp16 == 2 * 6 * (4 * 256 * 256 + 3 * 256 * 768 - 2 * 256 * 128)  # q,o: 256x256; k,v: 128x256; MLP
    assert stored / fp16 <= 0.30


def test_3bit_weights_export_where_the_library_packs_them_densely(tmp_path, capsys):
    """compressed-tensors 0.18+ packs 3-bit codes densely, as vLLM reads them; 0.17 pads them, so qig refuses there."""
    from qig.export.formats.compressed_tensors import packs_densely

    run, out = tmp_path / "w3", tmp_path / "w3-ct"
    args = ("--method", "rtn", "--wbits", 3, "--group-size", 128, "--dtype", "float32")
    assert run_cli("quantize", *args, "--output", run) == 0
    if not packs_densely(3):
        assert run_cli("export", "--input", run, "--output", out) == 2
        assert "packs 3-bit codes 10 to an int32 word with padding" in capsys.readouterr().err
        assert not out.exists() and _siblings(out) == []
        return
    assert run_cli("export", "--input", run, "--output", out) == 0
    packed = _tensors(out)["language_model.model.layers.0.mlp.down_proj.weight_packed"]
    assert packed.shape == (256, 768 * 3 // 32)  # dense: 32 codes in 3 words
    a, b = _load(run).state_dict(), _load(out).state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_fake_quant_export_is_a_plain_checkpoint_of_the_same_weights(awq_run, tmp_path):
    out = tmp_path / "fq"
    assert run_cli("export", "--input", awq_run, "--format", "fake-quant", "--output", out) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    a, b = _tensors(awq_run), _tensors(out)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]


GPTQ_W4 = ("--calib", "embedded", "--method", "gptq", "--wbits", 4, "--group-size", 128, "--n-samples", 8)


def test_gptq_export_packs_gptq_codes(model_dir, tmp_path):
    run = tmp_path / "gptq"
    args = ("--model", model_dir, *GPTQ_W4)
    assert run_cli("quantize", *args, "--no-progress", "--output", run) == 0
    out = tmp_path / "gptq-ct"
    assert run_cli("export", "--input", run, "--output", out) == 0
    torch.testing.assert_close(_logits(_load(out)), _logits(_load(run)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kept", ["none", "old-gptq-prefix"], ids=["no-parameters-kept", "old-gptq-prefix"])
def test_folders_of_an_older_qig_export_the_same(awq_run, awq_ct, tmp_path, kept):
    """Without kept parameters the grid is read back from the weights; the old gptq. names are still read."""
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    old.mkdir()
    for f in awq_run.iterdir():
        if f.is_file():
            (old / f.name).write_bytes(f.read_bytes())
    tensors = load_file(awq_run / "search.safetensors")
    assert any(k.startswith("quantized.") for k in tensors)
    renamed = {k.replace("quantized.", "gptq.", 1): v for k, v in tensors.items()}
    if kept == "none":
        renamed = {k: v for k, v in tensors.items() if not k.startswith("quantized.")}
    save_file(renamed, old / "search.safetensors")
    out = tmp_path / "old-ct"
    assert run_cli("export", "--input", old, "--output", out) == 0
    assert (out / "model.safetensors").read_bytes() == (awq_ct / "model.safetensors").read_bytes()


def _siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_act_order_is_refused_before_anything_is_written(model_dir, tmp_path, capsys):
    run = tmp_path / "gptq-ao"
    args = ("--model", model_dir, *GPTQ_W4)
    assert run_cli("quantize", *args, "--act-order", "--no-progress", "--output", run) == 0
    out = tmp_path / "ao-ct"
    assert run_cli("export", "--input", run, "--output", out) == 2
    assert "act-order" in capsys.readouterr().err
    assert not out.exists() and _siblings(out) == []


def test_a_model_that_is_not_quantized_is_refused(model_dir, tmp_path, capsys):
    fake_run = tmp_path / "fp"
    fake_run.mkdir()
    for f in model_dir.iterdir():
        (fake_run / f.name).write_bytes(f.read_bytes())
    (fake_run / "search.json").write_text(json.dumps({"config": {"method": "rtn", "wbits": 4, "group_size": 128}}))
    out = tmp_path / "fp-ct"
    assert run_cli("export", "--input", fake_run, "--output", out) == 2
    assert "not on a W4 g128 asym grid" in capsys.readouterr().err
    assert not out.exists() and _siblings(out) == []


def test_a_folder_without_search_json_is_refused(model_dir, tmp_path, capsys):
    assert run_cli("export", "--input", model_dir, "--output", tmp_path / "x") == 2
    assert "no search.json" in capsys.readouterr().err


def test_a_failed_export_leaves_no_partial_folder(awq_run, tmp_path, monkeypatch):
    import qig.export.writer as writer

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "_check_packed", fail)
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="disk full"):
        writer.export(awq_run, out)
    assert not out.exists() and _siblings(out) == []


def test_an_existing_output_is_kept_without_overwrite(awq_run, awq_ct, capsys):
    before = (awq_ct / "config.json").read_text()
    assert run_cli("export", "--input", awq_run, "--output", awq_ct) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (awq_ct / "config.json").read_text() == before


def test_quantize_writes_the_export_directly(model_dir, tmp_path):
    out = tmp_path / "direct"
    args = ("--model", model_dir, "--method", "rtn", "--wbits", 4, "--group-size", 128)
    assert run_cli("quantize", *args, "--format", "compressed-tensors", "--output", out) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert (out / "qig" / "search.json").is_file() and (out / "qig" / "report.json").is_file()
    assert _siblings(out) == []
    # the same as quantizing, then exporting
    run, again = tmp_path / "run", tmp_path / "again"
    assert run_cli("quantize", *args, "--output", run) == 0
    assert run_cli("export", "--input", run, "--output", again) == 0
    a, b = _tensors(out), _tensors(again)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_quantize_refuses_a_format_that_cannot_hold_the_setting_before_working(model_dir, tmp_path, capsys):
    out = tmp_path / "w4a6"
    args = ("--model", model_dir, "--method", "rtn", "--wbits", 4, "--abits", 6)
    assert run_cli("quantize", *args, "--format", "compressed-tensors", "--output", out) == 2
    assert "activation bits 6 cannot be exported" in capsys.readouterr().err
    assert not out.exists() and _siblings(out) == []
