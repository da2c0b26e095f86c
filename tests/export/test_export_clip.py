"""A run with the clipping search and duo scaling exports bit for bit: the export packs the clamped weights'
stored quantizer parameters, and transformers loads exactly the fake-quant weights back."""

import pytest
import torch
from _cli import run_cli
from test_export import _load, _logits

pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("method", ["awq", "qig"])
def test_a_clipped_duo_run_exports_its_weights_bit_for_bit(tmp_path, method):
    run, out = tmp_path / "run", tmp_path / "ct"
    code = run_cli("quantize", "--method", method, "--wbits", 4, "--group-size", 128, "--n-samples", 4,
                   "--batch-size", 4, "--n-grid", 4, "--weight-clip", "--duo-scaling", "--dtype", "float32",
                   "--no-progress", "--output", run)  # fmt: skip
    assert code == 0
    assert run_cli("export", "--input", run, "--output", out) == 0
    fake, export = _load(run), _load(out)
    a, b = fake.state_dict(), export.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    torch.testing.assert_close(_logits(export), _logits(fake), rtol=1e-5, atol=1e-5)
