"""The serving key layout (qig.models.layout) and the export's ignore entries, per family.

What vLLM 0.32 expects is written down here from its source, per family: the
checkpoint-to-vLLM prefix map of the model class (``hf_to_vllm_mapper``) and
where vLLM builds the vision tower's children. scripts/check_vllm.sh serves
the embedded model (a LLaVA) with vLLM itself.
"""

import json

import pytest
import torch
from _families import TINY, build
from _tensors import saved_keys

from qig.models import FAMILIES, family_for
from qig.models.layout import apply_layout, save_model

_LLAVA_MAP = {  # vllm/model_executor/models/llava.py, llava_next.py, llava_onevision.py, gemma3_mm.py, interns1.py
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}
_QWEN2_MAP = {  # qwen2_vl.py, qwen2_5_vl.py
    "model.language_model.": "language_model.model.",
    "model.visual.": "visual.",
    "lm_head.": "language_model.lm_head.",
    "model.": "language_model.model.",
}
_QWEN3_MAP = {
    "model.visual.": "visual.",
    "lm_head.": "language_model.lm_head.",
    "model.language_model.": "language_model.model.",
}
_CLIP_SIGLIP = ("vision_tower.", "vision_tower.vision_model.")  # clip.py / siglip.py: `self.vision_model = ...`

# Per tiny family: vLLM's prefix map, and (tower root in vLLM's names, the prefix every tower key must have there).
VLLM = {
    "llava-1.5": (_LLAVA_MAP, _CLIP_SIGLIP),
    "llava-next": (_LLAVA_MAP, _CLIP_SIGLIP),
    "llava-onevision": (_LLAVA_MAP, _CLIP_SIGLIP),
    "gemma3": (_LLAVA_MAP, _CLIP_SIGLIP),
    "internvl": (_LLAVA_MAP, ("vision_tower.", "vision_tower.")),  # interns1_vit.py: embeddings, encoder.layer
    "qwen2-vl": (_QWEN2_MAP, ("visual.", "visual.")),  # qwen2_vl.py: self.visual = Qwen2VisionTransformer
    "qwen2.5-vl": (_QWEN2_MAP, ("visual.", "visual.")),
    "qwen3-vl": (_QWEN3_MAP, ("visual.", "visual.")),
    "idefics3": ({}, ("model.vision_model.", "model.vision_model.")),  # idefics3.py: no mapper, Idefics3Model
    "smolvlm": ({}, ("model.vision_model.", "model.vision_model.")),
}


def _vllm_name(key: str, prefixes: dict) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _reload(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names whose tensors differ (or exist in one only)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(set(sa) ^ set(sb)) + [k for k in sa if k in sb and not torch.equal(sa[k], sb[k])]


@pytest.mark.parametrize("name", list(TINY))
def test_saved_keys_are_where_vllm_loads_them_and_transformers_reads_them_back(name, tmp_path):
    model, _ = build(name)
    fam = family_for(model)
    save_model(model, tmp_path / "served", fam)
    model.save_pretrained(tmp_path / "plain")
    prefixes, (root, want) = VLLM[name]
    served = [_vllm_name(k, prefixes) for k in saved_keys(tmp_path / "served")]
    tower = [k for k in served if k.startswith(root)]
    assert tower and all(k.startswith(want) for k in tower), [k for k in tower if not k.startswith(want)][:3]
    if want != root:  # the level was added: the plain save lacks it
        assert not any(_vllm_name(k, prefixes).startswith(want) for k in saved_keys(tmp_path / "plain"))
    else:
        assert saved_keys(tmp_path / "served") == saved_keys(tmp_path / "plain")
    assert _same_state(_reload(tmp_path / "served"), model) == []


def _saved_linear_names(model, folder) -> dict[str, str]:
    """In-memory name -> saved module name of every Linear, found by its (random, unique) weight in the shards."""
    from safetensors.torch import load_file

    by_value = {}
    for shard in folder.glob("*.safetensors"):
        for key, t in load_file(shard).items():
            by_value[(tuple(t.shape), t.numpy().tobytes())] = key
    tied = model.get_input_embeddings().weight  # a tied lm_head is saved as the embeddings only
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight is not tied:
            w = mod.weight.detach()
            out[name] = by_value[(tuple(w.shape), w.numpy().tobytes())].removesuffix(".weight")
    return out


@pytest.mark.parametrize("name", list(TINY))
def test_ignore_entries_match_the_kept_linears_and_no_decoder_linear(name, tmp_path):
    """Every Linear outside the decoder layers and none inside: in memory, in the saved names, in vLLM's names."""
    model, _ = build(name)
    fam = family_for(model)
    decoder = set(fam.decoder_linears(model))
    save_model(model, tmp_path, fam)
    saved = _saved_linear_names(model, tmp_path)
    prefixes = VLLM[name][0]
    assert len(saved) >= len(decoder) + 3  # the decoder's, the tower's and the projector's linears at least
    for linear, key in saved.items():
        kept = linear not in decoder
        for shown in (linear, key, _vllm_name(key, prefixes)):
            assert fam.ignores(shown) == kept, shown


def test_internvl2_ignore_entries_match_its_remote_code_names():
    """InternVL2's remote code (vLLM: internvl.py, InternVLChatModel): vision_model, mlp1, language_model.output."""
    fam = next(f for f in FAMILIES if f.name == "internvl2-internlm2")
    for kept in ("vision_model.encoder.layers.0.mlp.fc1", "mlp1.1", "language_model.output"):
        assert fam.ignores(kept), kept
    for decoder in ("language_model.model.layers.0.attention.wqkv", "language_model.model.layers.3.feed_forward.w2"):
        assert not fam.ignores(decoder), decoder


def test_the_shipped_model_is_in_the_serving_layout_and_loads_the_same_both_ways():
    from qig.calib import embedded_calibration
    from qig.embedded import default_model_dir
    from qig.loading import load_model_and_processor

    path = default_model_dir()
    keys = saved_keys(path)
    tower = [k for k in keys if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    assert all(k.startswith(("language_model.", "multi_modal_projector.", "vision_tower.")) for k in keys)
    llava = family_for(_reload(path))
    assert llava.name == "llava" and [llava.serving_key(k) for k in keys] == keys  # nothing left to rename
    ours, processor = load_model_and_processor()
    theirs = _reload(path)
    batch = next(embedded_calibration(processor, n_samples=4).batches(4)).inputs
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, theirs(**batch).logits)


def test_sharded_checkpoints_are_renamed_with_their_index_and_renaming_twice_changes_nothing(tmp_path):
    model, _ = build("llava-onevision")
    fam = family_for(model)
    n = save_model(model, tmp_path, fam, max_shard_size="50KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert n > 0 and len(shards) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(index) == saved_keys(tmp_path)
    assert any(k.startswith("vision_tower.vision_model.") for k in index)
    assert apply_layout(tmp_path, fam) == 0
    assert _same_state(_reload(tmp_path), model) == []
    assert not list(tmp_path.glob(".*"))  # no temporary file left
