"""Model knowledge: family lookup, the GQA rule for v->o, the naming fallback."""

import pytest
import torch
from _tiny import tiny_llava

from qig.errors import QigError
from qig.models import FAMILIES, family_for


@pytest.mark.parametrize(
    ("kv_heads", "groups"),
    [(2, ["attn_in", "mlp_in", "mlp_out"]), (4, ["attn_in", "attn_out", "mlp_in", "mlp_out"])],
    ids=["gqa-skips-v-o", "mha-has-v-o"],
)
def test_llava_groups(kv_heads, groups):
    model = tiny_llava(layers=1, kv_heads=kv_heads)
    fam = family_for(model)
    assert fam.name == "llava"
    layer = fam.decoder_layers(model)[0]
    assert [g.name for g in fam.active_groups(layer)] == groups


def _qwen2_lm():
    """A one-layer Qwen2 causal LM: Llama-named decoder layers at model.layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = Qwen2Config(vocab_size=32, num_key_value_heads=2, **sizes)
    return Qwen2ForCausalLM(config)


def test_unknown_type_with_llama_names_falls_back():
    lm = _qwen2_lm()
    fam = family_for(lm)
    assert fam.layers == "model.layers"
    assert fam.name.startswith("llama-names")


def test_unsupported_model_gets_the_listing_of_families():
    with pytest.raises(QigError, match="Linear .model type None. is not supported") as err:
        family_for(torch.nn.Linear(2, 2))
    message = str(err.value)
    for fam in FAMILIES:
        assert f"{fam.name} ({', '.join(fam.classes)})" in message
    assert "to add a family, append a ModelFamily entry to FAMILIES" in message


def test_a_known_type_with_other_layer_names_is_not_forced_into_its_entry():
    """InternVL2 with a Qwen2 LM (internvl_chat, Llama names): the fallback, not the InternLM2 entry."""
    lm = _qwen2_lm()
    chat = torch.nn.Module()
    chat.language_model = lm
    chat.config = type("Config", (), {"model_type": "internvl_chat"})()
    fam = family_for(chat)
    assert fam.name == "llama-names:internvl_chat"
    assert fam.layers == "language_model.model.layers"
