"""Decoder layers streamed from disk, offloaded streams, the memory plan, the token budget: same bits as in memory."""

import pytest
import torch
from _tensors import model_tensors, same

import qig
from qig.errors import QigError
from qig.loading import load_model_and_processor
from qig.methods.config import make_config
from qig.runs import write_output


def quantize_and_write(folder, decoder, method, out, work, calib_of, **options):
    model, proc = load_model_and_processor(folder, decoder=decoder)
    calib = calib_of(model, proc)
    config = make_config(method, **options)
    result = qig.quantize(model, config, calib, progress=False, work_dir=work)
    write_output(out, model, proc, result, {})
    return model, result


@pytest.mark.parametrize("method, options", [
    ("gptq", dict(wbits=3)),
    ("qig", dict(wbits=4, abits=8, group_size=None, n_grid=4)),
    ("rtn", dict(wbits=4)),
    ("mbq", dict(wbits=3, n_grid=4)),
], ids=["gptq", "qig-w4a8", "rtn", "mbq"])  # fmt: skip
def test_streaming_the_embedded_model(method, options, tmp_path):
    def calib_of(model, proc):
        return qig.calib.calibration_for(model, proc, None, n_samples=4)

    from qig.embedded import default_model_dir

    trees = {}
    for decoder in ("memory", "disk"):
        out = tmp_path / decoder
        quantize_and_write(default_model_dir(), decoder, method, out, tmp_path / f"w-{decoder}", calib_of, **options)
        trees[decoder] = model_tensors(out)
    assert same(trees["memory"], trees["disk"])


def test_a_streamed_model_needs_a_work_folder():
    model, proc = load_model_and_processor(decoder="disk")
    with pytest.raises(QigError, match="work_dir"):
        qig.quantize(model, make_config("rtn", wbits=4), None, progress=False)


OFFLOADED = {
    "awq": dict(wbits=3, n_grid=4),
    "qig": dict(wbits=3, n_grid=4),
    "qig-w4a8": dict(method="qig", wbits=4, abits=8, group_size=None, n_grid=4, reference_output="quantized"),
    "smoothquant-w8a8": dict(method="smoothquant", wbits=8, abits=8, group_size=None),
    "gptq-qig-weighted": dict(method="gptq", wbits=3, token_weights="qig"),
}


@pytest.mark.parametrize("name", list(OFFLOADED))
def test_offloaded_streams_and_group_inputs_give_the_same_bits(name, monkeypatch):
    from _tiny import calibration, tiny_llava

    from qig.hostmem import HostChunks

    options = dict(OFFLOADED[name])
    method = options.pop("method", name)
    held = []  # what the offloaded runs kept on the host, per chunk
    append = HostChunks.append
    monkeypatch.setattr(HostChunks, "append", lambda self, t: (held.append(t.shape), append(self, t))[1])
    results = {}
    for offload in ("none", "cpu"):
        held.clear()
        model = tiny_llava(kv_heads=4, outliers=True)  # MHA: the v -> o group too
        config = make_config(method, batch_size=2, **options)
        result = qig.quantize(model, config, calibration(6), progress=False, offload_streams=offload)
        results[offload] = (result.tensors(), model.state_dict())
        on_device = [k for k in result.memory_plan if k.endswith("one chunk on the device")]
        assert len(on_device) == (2 if offload == "cpu" else 0) and bool(held) == (offload == "cpu")
    assert same(results["none"][0], results["cpu"][0])
    assert same(results["none"][1], results["cpu"][1])


def test_the_plan_offloads_the_streams_first_then_the_group_inputs():
    from _tiny import tiny_llava

    from qig.methods import method_for
    from qig.models import family_for
    from qig.pipeline.plan import GROUP_INPUTS, STREAMS, shape_plan

    model = tiny_llava()
    config = make_config("qig", wbits=3, batch_size=2)

    def plan(free: int):
        return shape_plan(model, family_for(model), 16, 64, config, method_for(config), free)

    roomy = plan(2**30)
    assert not roomy.on_host(STREAMS) and not roomy.on_host(GROUP_INPUTS)
    needed = roomy.on("device")
    streams = roomy.items[roomy.key(STREAMS)]
    just_streams = plan(int((needed - streams + streams // 8) / 0.8) + 8)  # room once the streams go (a chunk stays)
    assert just_streams.on_host(STREAMS) and not just_streams.on_host(GROUP_INPUTS)
    both = plan(int(needed / 8))
    assert both.on_host(STREAMS) and both.on_host(GROUP_INPUTS)
    group = both.items[both.key(GROUP_INPUTS)]
    assert both.items[f"{GROUP_INPUTS}: one chunk on the device"] == group * 2 // 16  # 2 of 16 samples a chunk
    assert both.on("device") < just_streams.on("device") < needed
    assert "come to the device one chunk at a time" in both.describe()


def test_offloaded_chunks_copy_on_every_read():
    from qig.pipeline.capture import Chunk

    x = torch.randn(2, 3, 4)
    chunk = Chunk(x, x, torch.zeros(2, 3), [{}], offloaded=True)
    assert chunk.x is not x and torch.equal(chunk.x, x) and chunk.x is not chunk.x
    kept = Chunk(x, x, torch.zeros(2, 3), [{}])
    assert kept.x is x and kept.xq is x


def test_the_memory_plan_is_logged_before_the_work(caplog):
    import logging

    model, proc = load_model_and_processor()
    calib = qig.calib.calibration_for(model, proc, None, n_samples=4)
    with caplog.at_level(logging.INFO, logger="qig.pipeline.run"):
        result = qig.quantize(model, make_config("gptq", wbits=3), calib, progress=False)
    text = caplog.text
    assert "memory plan" in text and "calibration streams" in text and "GPTQ Hessians" in text
    n, t = len(calib), calib.seq_len
    streams = next(v for k, v in result.memory_plan.items() if k.startswith("calibration streams"))
    assert streams == 1 * n * t * 256 * 4  # GPTQ carries x^q only; hidden 256, float32


def test_the_token_budget_cuts_the_batches():
    from qig.methods.config import QuantConfig

    assert QuantConfig(batch_size=16).samples_per_batch(1000) == 16
    assert QuantConfig(batch_size=16, batch_tokens=2500).samples_per_batch(1000) == 2
    assert QuantConfig(batch_size=16, batch_tokens=10).samples_per_batch(1000) == 1
    model, proc = load_model_and_processor()
    calib = qig.calib.calibration_for(model, proc, None, n_samples=6)
    a = qig.quantize(model, make_config("awq", wbits=3, n_grid=4), calib, progress=False)
    model, _ = load_model_and_processor()
    budget = 2 * calib.seq_len
    b = qig.quantize(model, make_config("awq", wbits=3, n_grid=4, batch_tokens=budget), calib, progress=False)
    assert [g.ratio for g in a.groups] == [g.ratio for g in b.groups]
    assert all(torch.allclose(x.scales, y.scales) for x, y in zip(a.groups, b.groups, strict=True))
