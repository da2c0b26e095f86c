"""Export in bounded memory: ``--model-offload disk`` reads one decoder layer at a time and writes the same bytes."""

import pytest
import torch
from _cli import run_cli
from safetensors.torch import save, save_file

from qig.errors import QigError
from qig.export import export
from qig.export.formats import format_for
from qig.models.shards import Entry, write_file


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_same_bytes(a, b, skip=()):
    """Every file of the two folders, byte for byte (``skip``: relative paths that may differ)."""
    assert _files(a) == _files(b)
    differ = [f for f in _files(a) if f not in skip and (a / f).read_bytes() != (b / f).read_bytes()]
    assert differ == []


def test_a_file_written_one_tensor_at_a_time_has_the_bytes_of_save_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8]
    dtypes += [torch.uint8, torch.bool, torch.float8_e4m3fn, torch.int16]
    tensors = {}
    for i, dt in enumerate(dtypes):
        for j, shape in enumerate([(3, 5), (), (0, 4), (7,)]):
            tensors[f"layers.{j}.t{i}"] = (torch.randn(shape, generator=gen) * 10).to(dt)
    tensors["é.weight"] = torch.ones(2)  # a name past ASCII sorts by its bytes, as the library sorts
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    read = []
    entries = [Entry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    write_file(tmp_path / "b.safetensors", entries, lambda n: read.append(n) or tensors[n])
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert sorted(read) == sorted(tensors)  # each tensor asked for once
    assert save(tensors, metadata={"format": "pt"}) == (tmp_path / "b.safetensors").read_bytes()
    with pytest.raises(QigError, match=r"layers.0.t4: expected torch.int64 \[3, 5\], got torch.float16"):
        write_file(tmp_path / "c.safetensors", entries, lambda n: tensors[n].half())


@pytest.fixture(scope="module")
def family_sources(tmp_path_factory):
    """Two tiny families saved with their processors (a CLIP/Llama LLaVA-1.5 and Gemma 3)."""
    from models._families import build

    folders = {}
    for name in ("llava-1.5", "gemma3"):
        model, proc = build(name)
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
        proc.save_pretrained(folders[name])
    return folders


W4 = ("--method", "rtn", "--wbits", 4, "--group-size", 32)
W8A8 = ("--method", "rtn", "--wbits", 8, "--abits", 8)
AWQ_W4 = ("--method", "awq", "--wbits", 4, "--group-size", 128, "--n-grid", 2)
CASES = {  # id -> (model: None for the embedded one, quantize flags, export format, export keywords)
    "embedded-awq-w4": (None, AWQ_W4, "ct", {}),
    "embedded-awq-w4-shards": (None, AWQ_W4, "ct", {"max_shard_size": "300KB"}),
    "embedded-w8a8": (None, W8A8, "ct", {}),
    "embedded-w4-fake-quant-bf16": (None, W4, "fake-quant", {"dtype": "bfloat16", "max_shard_size": "1MB"}),
    "llava-1.5-w4": ("llava-1.5", W4, "ct", {}),
    "llava-1.5-w8a8-shards": ("llava-1.5", W8A8, "ct", {"max_shard_size": "40KB"}),
    "gemma3-w4": ("gemma3", W4, "ct", {}),
    "gemma3-w8a8": ("gemma3", W8A8, "ct", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_streamed_export_writes_the_bytes_of_an_in_memory_export(case, family_sources, tmp_path):
    model, flags, fmt, kwargs = CASES[case]
    fmt = "compressed-tensors" if fmt == "ct" else fmt
    source = ("--model", family_sources[model]) if model else ()
    assert run_cli("quantize", *source, *flags, "--no-progress", "--output", tmp_path / "run") == 0
    whole = export(tmp_path / "run", tmp_path / "memory", fmt, model_offload="none", **kwargs)
    streamed = export(tmp_path / "run", tmp_path / "disk", fmt, model_offload="disk", **kwargs)
    assert_same_bytes(whole.path, streamed.path)
    assert (whole.linears, whole.ignored, whole.layout) == (streamed.linears, streamed.ignored, streamed.layout)
    sharded = "max_shard_size" in kwargs
    assert (whole.path / "model.safetensors.index.json").is_file() == sharded
    assert len(list(whole.path.glob("model*.safetensors"))) > 2 if sharded else 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no part files left beside


def test_a_streamed_export_holds_one_decoder_layer_at_a_time(tmp_path, monkeypatch):
    assert run_cli("quantize", *W4, "--no-progress", "--output", tmp_path / "run") == 0
    fmt = type(format_for("compressed-tensors"))
    write_layer, held = fmt.write_layer, []

    def counting(self, model, quantized):
        from qig.models import family_for

        layers = family_for(model).decoder_layers(model)
        held.append(sum(next(m.parameters()).device.type != "meta" for m in layers))
        return write_layer(self, model, quantized)

    monkeypatch.setattr(fmt, "write_layer", counting)
    export(tmp_path / "run", tmp_path / "ct", model_offload="disk")
    assert held == [1] * 6  # the embedded model's 6 layers, each alone in memory


def test_qig_quantize_streamed_from_disk_writes_the_export_of_an_in_memory_run(tmp_path, capsys):
    """``qig quantize --model-offload disk --format compressed-tensors``: the run and its export both streamed."""
    outs = {}
    for offload in ("none", "disk"):
        outs[offload] = tmp_path / offload
        argv = ("quantize", *W4, "--model-offload", offload, "--format", "compressed-tensors")
        assert run_cli(*argv, "--no-progress", "--output", outs[offload]) == 0
    assert_same_bytes(outs["none"], outs["disk"], skip={"qig/report.json"})  # the report says how it ran
    capsys.readouterr()
    argv = ("export", "--input", tmp_path / "run", "--output", tmp_path / "again", "--model-offload", "disk")
    assert run_cli("quantize", *W4, "--no-progress", "--output", tmp_path / "run") == 0
    assert run_cli(*argv) == 0
    assert "wrote compressed-tensors model to" in capsys.readouterr().out
    assert_same_bytes(outs["none"], tmp_path / "again", skip={"qig/report.json"})


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_a_dtype_that_breaks_the_8_bit_codes_is_refused_with_the_way_out(offload, tmp_path):
    """W8 codes of a float16 run do not survive a cast to bfloat16 (8 bits of mantissa); nothing is written."""
    assert run_cli("quantize", *W8A8, "--no-progress", "--output", tmp_path / "run") == 0
    with pytest.raises(QigError, match="cast to bfloat16, the weights no longer hold qig's 8-bit codes exactly"):
        export(tmp_path / "run", tmp_path / "ct", dtype="bfloat16", model_offload=offload)
    assert not (tmp_path / "ct").exists() and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_an_unknown_model_offload_is_refused_before_anything_is_written(tmp_path):
    assert run_cli("quantize", *W4, "--no-progress", "--output", tmp_path / "run") == 0
    with pytest.raises(QigError, match="model_offload 'ram': use auto, disk or none"):
        export(tmp_path / "run", tmp_path / "ct", model_offload="ram")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
