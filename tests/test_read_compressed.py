"""Reading compressed-tensors checkpoints (qig.compressed): llm-compressor's presets, written by the library alone.

Each checkpoint is what llm-compressor writes for a scheme (its presets W4A16_ASYM, AWQ's default, W4A16 and W8A8;
int8 per output channel, a custom scheme), made here with ``compressed-tensors`` only: its scheme attached to the
embedded model's decoder linears, min-max scales from the library's ``calculate_qparams``, compressed by
``ModelCompressor`` and saved as llm-compressor saves (``save_pretrained`` then ``update_config``). qig must load
each as the fake-quant model of the same codes: the library's ``fake_quantize`` of the source weights, and for W8A8
qig's own per-token activation quantizers, as on a qig W-A folder.
"""

import json
import shutil

import pytest
import torch
from _cli import run_cli
from _tiny import calibration

from qig.errors import QigError

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

# the schemes as data: presets of compressed_tensors.quantization.quant_scheme.PRESET_SCHEMES, and int8 per channel
TOKEN_A8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
CASES = {
    "w4a16-g128-asym": ({"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 128}, None),
    "w4a16-g128-sym": ({"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 128}, None),
    "w8a16-channel": ({"num_bits": 8, "symmetric": True, "strategy": "channel"}, None),
    "w8a8-int": ({"num_bits": 8, "symmetric": True, "strategy": "channel"}, TOKEN_A8),
}
# the kept parts, as llm-compressor's examples for LLaVA list them
IGNORE = ["re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*lm_head"]


def _source():
    from transformers import AutoModelForImageTextToText

    from qig.embedded import default_model_dir

    return AutoModelForImageTextToText.from_pretrained(default_model_dir(), dtype=torch.float32).eval()


@torch.no_grad()
def write_checkpoint(case: str, folder) -> dict[str, torch.Tensor]:
    """The embedded model compressed with ``case``'s scheme into ``folder``; returns the fake-quant weights."""
    from qig.embedded import build_processor

    weights, acts = CASES[case]
    args = QuantizationArgs(type="int", **weights)
    scheme = QuantizationScheme(
        targets=["Linear"], weights=args, input_activations=QuantizationArgs(**acts) if acts else None
    )
    model = _source()
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=IGNORE))
    fake = {}
    for name, m in model.named_modules():
        if getattr(m, "quantization_scheme", None) is None:
            continue
        w = m.weight.data  # [out, in]
        groups = w.reshape(w.shape[0], -1, args.group_size or w.shape[1])  # [out, G, g]
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)  # [out, G]
        m.weight_scale.copy_(scale.reshape(m.weight_scale.shape))
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.copy_(zero.reshape(m.weight_zero_point.shape))
        fake[name] = fake_quantize(w, m.weight_scale, getattr(m, "weight_zero_point", None), args)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    build_processor().save_pretrained(folder)
    return fake


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``written(case)``: (case, folder, fake-quant weights), each case written once per module."""
    cache = {}

    def get(case: str):
        if case not in cache:
            folder = tmp_path_factory.mktemp(case) / "ct"
            cache[case] = case, folder, write_checkpoint(case, folder)
        return cache[case]

    return get


@pytest.fixture(params=list(CASES))
def checkpoint(request, written):
    return written(request.param)


def _fake_quant_model(fake: dict[str, torch.Tensor], abits: int):
    """The source model with the fake-quant weights (and qig's activation quantizers on them for W-A)."""
    from qig.quant.activation import install_activation_quantizers
    from qig.quant.spec import activation_spec

    model = _source()
    for name, w in fake.items():
        model.get_submodule(name).weight.data.copy_(w)
    if abits < 16:
        install_activation_quantizers([model.get_submodule(n) for n in fake], activation_spec(abits))
    return model


def _logits(model):
    batch = next(calibration(4, seed=3).batches(4))
    with torch.no_grad():
        return model(**batch.inputs).logits


def test_the_checkpoint_is_what_llm_compressor_writes(checkpoint):
    case, folder, fake = checkpoint
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == ("int-quantized" if case == "w8a8-int" else "pack-quantized")
    assert len(fake) == 6 * 7  # 6 decoder layers x 7 linears; tower, projector and lm_head kept


def test_loaded_weights_are_the_fake_quant_weights_and_the_logits_match(checkpoint):
    from qig.loading import activation_note, load_model_and_processor

    case, folder, fake = checkpoint
    model, _ = load_model_and_processor(folder)
    assert [n for n, w in fake.items() if not torch.equal(model.get_submodule(n).weight, w)] == []
    source = _source().state_dict()
    kept = [k for k in source if k.rsplit(".", 1)[0] not in fake]
    assert [k for k in kept if not torch.equal(model.state_dict()[k], source[k])] == []
    abits = 8 if case == "w8a8-int" else 16
    reference = _fake_quant_model(fake, abits)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)
    note = activation_note(model)
    if abits < 16:
        assert note == "activations quantized at run time: per-token symmetric 8-bit on 42 decoder linears"
        assert (_logits(model) - _logits(_fake_quant_model(fake, 16))).abs().max() > 1e-3  # really quantized
    else:
        assert note is None


@pytest.mark.parametrize("case", ["w4a16-g128-asym", "w8a8-int"])
def test_qig_eval_on_the_checkpoint_gives_the_fake_quant_answers(case, written, tmp_path):
    """``qig eval`` on the checkpoint answers as on a plain folder of the fake-quant weights (a qig W-A folder for
    W8A8): the accuracy of the fake-quant conversion, question by question."""
    from qig.evaluate import run_eval

    _, folder, fake = written(case)
    assert run_cli("eval", "--model", folder, "--limit", 40, "--json", tmp_path / "eval.json") == 0
    got = json.loads((tmp_path / "eval.json").read_text())
    fq = tmp_path / "fake-quant"
    _fake_quant_model(fake, 16).save_pretrained(fq)
    shutil.copy(folder / "processor_config.json", fq)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (folder / name).exists():
            shutil.copy(folder / name, fq)
    if case == "w8a8-int":  # a qig W-A folder: its activation quantizers are re-installed from this record
        config = json.loads((fq / "config.json").read_text())
        config["qig_quantization"] = {"abits": 8}
        (fq / "config.json").write_text(json.dumps(config))
    want = run_eval(model_dir=fq, limit=40)
    assert [r["prediction"] for r in got["predictions"]] == [r["prediction"] for r in want["predictions"]]
    assert got["accuracy"] == want["accuracy"]


def test_the_lmms_eval_bridge_reads_the_checkpoint(written):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (docs/lmms-eval.md)")
    from qig.embedded import world
    from qig.evaluate import generate_answers
    from qig.lmms.model import QigModel

    _, folder, fake = written("w8a8-int")
    lm = QigModel(pretrained=str(folder), batch_size=4)
    assert lm.activations == "activations quantized at run time: per-token symmetric 8-bit on 42 decoder linears"
    assert all(torch.equal(lm.model.get_submodule(n).weight, w) for n, w in fake.items())
    records = world.generate("eval", 4, seed=3)
    reference = _fake_quant_model(fake, 8)
    assert generate_answers(lm.model, lm.processor, records) == generate_answers(reference, lm.processor, records)


def _bad_folder(tmp_path, edit) -> str:
    """A folder whose config.json is a W4A16 checkpoint's with ``edit`` applied (no weights: refused before)."""
    qc = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": dict(CASES["w4a16-g128-asym"][0])}},
        "ignore": IGNORE,
    }
    from qig.embedded import default_model_dir

    config = json.loads((default_model_dir() / "config.json").read_text())
    config["quantization_config"] = qc
    edit(qc)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _set(path: str, value):
    def edit(qc):
        *parents, last = path.split(".")
        node = qc
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


BAD = {
    "mxfp6": (_set("config_groups.group_0.format", "mxfp6-pack-quantized"), "stores weights as 'mxfp6-pack-quantized'"),
    "int-as-nvfp4": (
        _set("config_groups.group_0.format", "nvfp4-pack-quantized"),
        "quantizes int 4-bit weights in nvfp4-pack-quantized",
    ),
    "int-as-float8": (_set("format", "float-quantized"), "quantizes int 4-bit weights in float-quantized"),
    "float-weights": (_set("config_groups.group_0.weights.type", "float"), "quantizes float 4-bit weights"),
    "static-activations": (
        _set("config_groups.group_0.input_activations", {**TOKEN_A8, "dynamic": False, "strategy": "tensor"}),
        "quantizes input activations as int 8-bit tensor symmetric static",
    ),
    "kv-cache": (_set("kv_cache_scheme", {"num_bits": 8, "type": "float"}), "quantizes the KV cache"),
    "act-order": (_set("config_groups.group_0.weights.actorder", "group"), "actorder='group' has been removed"),
    "sparse": (_set("sparsity_config", {"format": "sparse-bitmask"}), "has a sparsity_config"),
    "not-a-config": (_set("config_groups.group_0.weights.num_bits", "four"), "is not a compressed-tensors config"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_config_qig_cannot_read_is_refused_in_one_line(case, tmp_path, capsys):
    from qig.loading import load_model_and_processor

    edit, words = BAD[case]
    folder = _bad_folder(tmp_path, edit)
    with pytest.raises(QigError, match="quantization_config") as err:
        load_model_and_processor(folder)
    assert words in str(err.value) and "\n" not in str(err.value)
    capsys.readouterr()
    assert run_cli("eval", "--model", folder) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and words in message


def test_a_compressed_checkpoint_is_not_streamed_from_disk(tmp_path):
    from qig.loading import load_model_and_processor

    folder = _bad_folder(tmp_path, lambda qc: None)
    with pytest.raises(QigError, match="cannot be streamed from disk"):
        load_model_and_processor(folder, decoder="disk")
