"""Real checkpoints' shapes, before a GPU hour: ``qig.preflight`` / ``qig plan`` on published configs.

Each fixture under tests/fixtures/real_configs is a real checkpoint's config.json and
preprocessor_config.json (provenance in its README.md). The model is built on the meta
device: no weights, no network, well under a second per fixture.
"""

from pathlib import Path

import pytest
from _cli import run_cli

from qig.errors import QigError
from qig.methods.config import make_config
from qig.preflight import group_size_refusal, preflight, tp_refusals

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "real_configs"

# fixture: (family, decoder layers, intermediate width, vision tokens at 1344x1344, TP degrees refused at g128)
REAL = {
    "qwen2-vl-7b-instruct": ("qwen2-vl", 28, 18944, 2304, [8]),
    "qwen2.5-vl-7b-instruct": ("qwen2.5-vl", 28, 18944, 2304, [8]),
    "qwen2.5-vl-72b-instruct": ("qwen2.5-vl", 80, 29568, 2304, [2, 4, 8]),
    "qwen3-vl-8b-instruct": ("qwen3-vl", 36, 12288, 1764, []),
    "llava-onevision-qwen2-7b-ov-hf": ("llava-onevision", 28, 18944, 7371, [8]),
    "llava-onevision-qwen2-72b-ov-hf": ("llava-onevision", 80, 29568, 7371, [2, 4, 8]),
    "llava-1.5-7b-hf": ("llava", 32, 11008, 576, [4, 8]),
    "internvl3-8b-hf": ("internvl", 28, 18944, 2560, [8]),
    "idefics3-8b-llama3": ("idefics3", 32, 14336, 2873, []),
    "smolvlm2-2.2b-instruct": ("smolvlm", 24, 8192, 1377, []),
    "gemma-3-12b-it": ("gemma3", 48, 15360, 256, []),
}
MHA = {"llava-1.5-7b-hf", "smolvlm2-2.2b-instruct"}  # v -> o exists (as many KV heads as query heads)


def test_every_fixture_is_listed():
    assert sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) == sorted(REAL)


@pytest.fixture(scope="module")
def reports():
    """One AWQ W4 g128 report per fixture (built once: the meta models are the slow part)."""
    config = make_config("awq", wbits=4, group_size=128)
    return {name: preflight(FIXTURES / name, config) for name in REAL}


@pytest.mark.parametrize("name", list(REAL))
def test_groups_resolve_with_real_shapes(reports, name):
    family, n_layers, intermediate, _, _ = REAL[name]
    r = reports[name]
    assert (r.family, r.n_layers) == (family, n_layers)
    groups = {g["name"]: g for g in r.groups}
    assert [n for n, g in groups.items() if g["active"]] == (
        ["attn_in", "attn_out", "mlp_in", "mlp_out"] if name in MHA else ["attn_in", "mlp_in", "mlp_out"]
    )
    gate_out, _ = groups["mlp_in"]["linears"]["mlp.gate_proj"]
    down_out, down_in = groups["mlp_out"]["linears"]["mlp.down_proj"]
    assert gate_out == down_in == intermediate
    assert down_out == r.linears["self_attn.q_proj"][1]  # the residual width
    assert r.dtype in ("bfloat16", "float16")


@pytest.mark.parametrize("name", list(REAL))
def test_group_size_and_tensor_parallel(reports, name):
    *_, refused = REAL[name]
    r = reports[name]
    assert r.group_size_ok and r.refusal is None and 128 in r.working_group_sizes
    assert [d for d, why in r.tensor_parallel.items() if why] == refused
    assert r.tensor_parallel[1] == []


@pytest.mark.parametrize("name", list(REAL))
def test_vision_tokens_and_memory_plan(reports, name):
    *_, tokens, _ = REAL[name]
    r = reports[name]
    assert r.vision["tokens_per_image"] == tokens
    assert r.tokens_per_sample == tokens + 64
    items = r.plan.items
    assert items["one decoder layer"] > 0 and items["model outside the decoder"] > 0  # counted on the meta device
    assert any(k.startswith("calibration streams") for k in items)
    d = r.to_dict()
    assert d["device_memory"] == 80 * 2**30 and d["device_peak"] == r.plan.on("device")
    assert "memory plan (one GPU, 80.00 GiB)" in r.describe()


VISION_3420 = "vision tower: MLP width 3420 does not divide by 8"  # Qwen2.5-VL's vision MLP, sharded by vLLM too


def test_qwen25_vl_72b_g128_names_the_refused_tp_degrees(reports):
    r = reports["qwen2.5-vl-72b-instruct"]
    assert r.linears["mlp.down_proj"] == (8192, 29568)  # 231 groups of 128
    for degree, groups in ((2, "115.5"), (4, "57.75"), (8, "28.875")):
        why, *vision = r.tensor_parallel[degree]
        assert why.startswith(f"mlp.down_proj: in_features 29568 / {degree}") and f"({groups})" in why
        assert vision == r.vision_tensor_parallel[degree] == ([] if degree < 8 else [VISION_3420])
    assert r.tensor_parallel_alternatives == {
        2: ["g64", "g32", "per-channel"],
        4: ["g32", "per-channel"],
        8: ["per-channel"],
    }
    # per-channel weights repeat their scales on every rank: vLLM's group rule does not apply; what is left at TP 8
    # is the vision tower's MLP, 3420 wide (vLLM shards the tower too unless --mm-encoder-tp-mode data)
    channel = preflight(FIXTURES / "qwen2.5-vl-72b-instruct", make_config("awq", wbits=4, group_size=None))
    assert {d: why for d, why in channel.tensor_parallel.items() if why} == {8: [VISION_3420]}
    assert channel.vision_tensor_parallel[8] == channel.tensor_parallel[8]


def test_the_7b_size_passes_where_the_72b_fails():
    # 18944 = 148 x 128: two ranks hold 74 groups each; 29568 = 231 x 128: no even split
    assert tp_refusals({"mlp.down_proj": (3584, 18944)}, 28, 4, 128, 2) == []
    assert tp_refusals({"mlp.down_proj": (8192, 29568)}, 64, 8, 64, 2) == []  # 462 groups of 64
    assert tp_refusals({"mlp.gate_proj": (100, 64)}, 8, 8, None, 8) == [
        "mlp.gate_proj: out_features 100 do not divide by 8"
    ]


@pytest.mark.parametrize(
    ("heads", "kv", "degree", "ok"),
    [(28, 4, 4, True), (28, 4, 8, False), (64, 8, 8, True), (32, 8, 16, True), (32, 6, 4, False)],
    ids=["28h-4kv-tp4", "28h-tp8", "64h-8kv-tp8", "kv-replicas", "kv-6-tp4"],
)
def test_attention_heads_rule(heads, kv, degree, ok):
    assert (tp_refusals({}, heads, kv, 128, degree) == []) == ok


def test_a_group_size_that_divides_nothing_is_refused_with_the_divisors():
    r = preflight(FIXTURES / "qwen2-vl-7b-instruct", make_config("awq", wbits=4, group_size=100))
    assert not r.group_size_ok
    assert r.refusal == (
        "group_size 100 does not divide in_features 3584 of self_attn.q_proj (and 6 more linears); use 32, 64, 128 "
        "or 256 (they divide every quantized linear), or per-channel (--group-size channel)"
    )
    assert group_size_refusal({"mlp.down_proj": 29568}, 256).endswith(
        "use 32, 64 or 128 (they divide every quantized linear), or per-channel (--group-size channel)"
    )
    assert group_size_refusal({"a": 3584}, 128) is None and group_size_refusal({"a": 3583}, None) is None


def test_sample_tokens_instead_of_an_image_and_the_length_cap_note():
    config = make_config("qig", wbits=3)
    r = preflight(FIXTURES / "qwen2-vl-7b-instruct", config, n_samples=8, tokens=700)
    assert r.vision is None and r.tokens_per_sample == 700
    assert not any("--max-length" in n for n in r.notes)
    big = preflight(FIXTURES / "qwen2-vl-7b-instruct", config, n_samples=8, image_size=(1344, 1344))
    assert any("--max-length 1024" in n for n in big.notes)  # 2368 tokens: the default cap would cut the image


def test_a_folder_without_a_config_is_refused(tmp_path):
    with pytest.raises(QigError, match="has no config.json"):
        preflight(tmp_path, make_config("awq", wbits=4))


def test_qig_plan_prints_the_report(capsys):
    folder = FIXTURES / "qwen2.5-vl-72b-instruct"
    assert run_cli("plan", "--model", folder, "--method", "awq", "--wbits", "4", "--group-size", "128") == 0
    out = capsys.readouterr().out
    assert "Qwen2_5_VLForConditionalGeneration (qwen2.5-vl family), 80 decoder layers" in out
    assert "mlp_out   mlp.up_proj -> mlp.down_proj [8192, 29568]" in out
    assert "TP 2: refused: mlp.down_proj: in_features 29568 / 2 = 14784 is not a whole number of groups of 128" in out
    assert "1344x1344 image: 2304 vision tokens" in out
    assert "memory plan (one GPU, 80.00 GiB):" in out


@pytest.mark.parametrize(
    ("scheme", "words"),
    [
        ("NVFP4", "g16 divides every quantized linear's input"),
        (
            "W4AFP8",
            "TP 2: refused: mlp.down_proj: in_features 29568 / 2 = 14784 is not a whole number of groups of 128",
        ),
        ("FP8_DYNAMIC", "CompressedTensorsW8A8Fp8"),
    ],
)
def test_qig_plan_of_a_scheme_checks_its_groups(capsys, scheme, words):
    """A W-A scheme with groups (W4AFP8, NVFP4) is checked for divisibility and TP like a weight-only group size."""
    assert run_cli("plan", "--model", FIXTURES / "qwen2.5-vl-72b-instruct", "--method", "awq", "--scheme", scheme) == 0
    assert words in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--group-size", "100"], "group_size 100 does not divide in_features 3584 of self_attn.q_proj"),
        (["--image-size", "12x"], "--image-size '12x' must be WIDTHxHEIGHT"),
        (["--sample-tokens", "500", "--image-size", "64x64"], "--sample-tokens gives the whole sample"),
        (["--method", "rtn", "--n-samples", "8"], "--n-samples: rtn uses no calibration data"),
        (["--method", "awq", "--alpha", "0.3"], "awq has no option --alpha"),
    ],
    ids=["group-size", "image-size", "tokens-and-image", "rtn-calibration", "foreign-flag"],
)
def test_qig_plan_refuses_bad_input_in_one_line(capsys, args, message):
    assert run_cli("plan", "--model", FIXTURES / "qwen2-vl-7b-instruct", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_qig_plan_json_and_a_missing_folder(capsys, tmp_path):
    import json

    assert run_cli("plan", "--model", FIXTURES / "gemma-3-12b-it", "--json", "--device-memory", "24") == 0
    data = json.loads(capsys.readouterr().out)
    assert (
        data["family"] == "gemma3" and data["device_memory"] == 24 * 2**30 and data["vision"]["tokens_per_image"] == 256
    )
    assert run_cli("plan", "--model", tmp_path / "nothing") == 2
    assert "does not exist" in capsys.readouterr().err


def test_docs_plan_md_shows_what_qig_plan_prints(capsys, monkeypatch):
    """docs/plan.md's examples are real output: each ```bash qig plan``` block is followed by what it prints now."""
    import re
    import shlex

    root = FIXTURES.parents[2]
    monkeypatch.chdir(root)  # the page's commands name the fixtures from the repository root
    page = (root / "docs" / "plan.md").read_text()
    pairs = re.findall(r"```bash\n(qig plan [^\n]+)\n```\n+```text\n(.*?)```", page, flags=re.S)
    assert len(pairs) == 2
    for command, shown in pairs:
        assert run_cli(*shlex.split(command)[1:]) == 0
        assert capsys.readouterr().out == shown, f"docs/plan.md is out of date for: {command}"
    for name, (*_, tokens, _) in REAL.items():
        assert re.search(rf"^\| {re.escape(name)} \| {tokens} \|", page, flags=re.M), name


def test_method_options_show_in_the_report(capsys):
    folder = FIXTURES / "qwen2-vl-7b-instruct"
    assert run_cli("plan", "--model", folder, "--method", "gptq", "--token-weights", "qig", "--steps", "4") == 0
    assert capsys.readouterr().out.splitlines()[1] == "gptq W4A16 g128, token_weights=qig(steps=4)"
    # QIG's path batch grows with its quadrature nodes: the options reach the memory plan
    small = preflight(folder, make_config("qig", wbits=4, steps=2), n_samples=4, tokens=64)
    large = preflight(folder, make_config("qig", wbits=4, steps=32), n_samples=4, tokens=64)
    key = next(k for k in large.plan.items if k.startswith("QIG path batch"))
    assert large.plan.items[key] > next(v for k, v in small.plan.items.items() if k.startswith("QIG path batch"))


def _real_processor(name: str, config):
    """The family's own processor class around the fixture's image processor and a word-level tokenizer.

    Returns (processor, prompt with one image placeholder, the token the processor repeats per image feature).
    The processor's settings are the ones the published processor_config.json files carry, from the config.
    """
    import transformers
    from _families import IDEFICS_TOKENS, no_video_processor, tokenizer
    from transformers import AutoImageProcessor

    ip = AutoImageProcessor.from_pretrained(FIXTURES / name, local_files_only=True)
    kind = config.model_type
    if kind in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        tok = tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], "<|im_end|>", "<pad>")
        cls = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}
        proc = getattr(transformers, cls[kind])(image_processor=ip, tokenizer=tok, video_processor=no_video_processor())
        return proc, "<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>"
    if kind == "llava_onevision":
        tok = tokenizer(
            ["<image>", "<video>"], "<|im_end|>", "<pad>", {"image_token": "<image>", "video_token": "<video>"}
        )
        vision = config.vision_config
        proc = transformers.LlavaOnevisionProcessor(
            image_processor=ip,
            tokenizer=tok,
            video_processor=no_video_processor(),
            num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio,
        )
        return proc, "<image>", "<image>"
    if kind == "llava":
        tok = tokenizer(["<image>"], "</s>", "<pad>", {"image_token": "<image>"})
        proc = transformers.LlavaProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,
        )
        return proc, "<image>", "<image>"
    if kind == "internvl":
        specials = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
        tok = tokenizer([*specials.values(), "<video>"], "<|im_end|>", "<pad>", {**specials, "video_token": "<video>"})
        proc = transformers.InternVLProcessor(
            image_processor=ip, tokenizer=tok, video_processor=no_video_processor(), image_seq_length=256
        )
        return proc, "<IMG_CONTEXT>", "<IMG_CONTEXT>"
    if kind in ("idefics3", "smolvlm"):
        tok = tokenizer(IDEFICS_TOKENS, "<end_of_utterance>", "<pad>", {"image_token": "<image>"})
        vision = config.vision_config
        per_crop = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
        if kind == "idefics3":
            proc = transformers.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=per_crop)
        else:
            proc = transformers.SmolVLMProcessor(
                image_processor=ip, tokenizer=tok, video_processor=no_video_processor(), image_seq_len=per_crop
            )
        return proc, "<image>", "<image>"
    assert kind == "gemma3", kind
    specials = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = tokenizer(list(specials.values()), "<end_of_turn>", "<pad>", specials, bos="<bos>")
    proc = transformers.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=config.mm_tokens_per_image)
    return proc, "<start_of_image>", "<image_soft_token>"


@pytest.mark.parametrize("name", list(REAL))
def test_vision_tokens_match_the_real_processor_on_a_real_image(name):
    """The count qig plan prints is the number of image tokens the family's processor puts in a prompt."""
    from _families import image
    from transformers import AutoConfig

    from qig.preflight import vision_tokens

    config = AutoConfig.from_pretrained(FIXTURES / name, local_files_only=True)
    processor, prompt, token = _real_processor(name, config)
    width, height = 1000, 700  # not square, not a multiple of any tile: resizing and tiling both show
    ids = processor(images=[image(width, height)], text=[prompt], return_tensors="pt")["input_ids"][0]
    expected = int((ids == processor.tokenizer.convert_tokens_to_ids(token)).sum())
    assert vision_tokens(FIXTURES / name, config, width, height)["tokens_per_image"] == expected


def test_qig_plan_takes_a_hub_id_from_the_cache_and_refuses_an_uncached_one(tmp_path, monkeypatch, capsys):
    """A hub id resolves to its cached snapshot (offline here: conftest sets HF_HUB_OFFLINE); only JSON is needed."""
    import shutil

    cache = tmp_path / "hub"
    repo = cache / "models--Qwen--Qwen2.5-VL-72B-Instruct"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(FIXTURES / "qwen2.5-vl-72b-instruct", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert run_cli("plan", "--model", "Qwen/Qwen2.5-VL-72B-Instruct", "--method", "awq", "--wbits", "4") == 0
    assert "TP 2: refused: mlp.down_proj: in_features 29568 / 2" in capsys.readouterr().out
    assert run_cli("plan", "--model", "Qwen/Qwen2-VL-7B-Instruct") == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "Qwen/Qwen2-VL-7B-Instruct is not in the Hugging Face cache" in err
