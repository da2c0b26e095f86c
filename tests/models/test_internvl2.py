"""InternVL2 with its InternLM2 decoder (remote code, no offline source): a module tree with its names and shapes.

The toy mirrors the remote code's layout (``language_model.model.layers[i]`` with
``attention_norm``, ``attention.wqkv`` / ``attention.wo``, ``ffn_norm``,
``feed_forward.w1/w3/w2``; wqkv packs per KV head group its q heads, then k, then v;
layers return a tuple) at a tiny size with GQA, as in InternVL2-8B. Its attention has
no rotary embedding (the scale groups do not depend on it). There is no processor, so
calibration samples are hand-built token ids with <IMG_CONTEXT> placeholders.
"""

import json
import types

import pytest
import torch
from _families import tokenizer

import qig
from qig.calib import ANSWER, PROMPT, VISION, CalibrationSet, Sample
from qig.errors import QigError
from qig.evaluate import load_model_and_processor
from qig.models import family_for, get_module
from qig.quant.fold import fold_scales_

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 64, 4, 2, 16, 128, 40


class RMSNorm(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wqkv = torch.nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=False)
        self.wo = torch.nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_value=None,
        output_attentions=False,
        use_cache=False,
        **kwargs,
    ):
        b, t, _ = hidden_states.shape
        groups = HEADS // KV_HEADS
        qkv = self.wqkv(hidden_states).view(b, t, KV_HEADS, groups + 2, HEAD_DIM)
        q = qkv[..., :groups, :].reshape(b, t, HEADS, HEAD_DIM).transpose(1, 2)  # [b, H, t, d]
        k = qkv[..., -2, :].repeat_interleave(groups, dim=2).transpose(1, 2)
        v = qkv[..., -1, :].repeat_interleave(groups, dim=2).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return self.wo(out.transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM)), None, None


class FeedForward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Linear(HIDDEN, INTER, bias=False)
        self.w3 = torch.nn.Linear(HIDDEN, INTER, bias=False)
        self.w2 = torch.nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(HIDDEN), Attention()
        self.ffn_norm, self.feed_forward = RMSNorm(HIDDEN), FeedForward()

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_value=None,
        output_attentions=False,
        use_cache=False,
        **kwargs,
    ):
        h = hidden_states + self.attention(self.attention_norm(hidden_states), attention_mask=attention_mask)[0]
        return (h + self.feed_forward(self.ffn_norm(h)),)  # the remote code returns a tuple


class InternVLChatToy(torch.nn.Module):
    def __init__(self, img_context_id: int):
        super().__init__()
        self.config = types.SimpleNamespace(model_type="internvl_chat")
        self.img_context_id = img_context_id
        self.vision_model = torch.nn.Linear(12, 32)  # stands in for InternViT
        self.mlp1 = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, HIDDEN))
        lm = torch.nn.Module()
        lm.model = torch.nn.Module()
        lm.model.tok_embeddings = torch.nn.Embedding(VOCAB, HIDDEN)
        lm.model.layers = torch.nn.ModuleList([DecoderLayer() for _ in range(2)])
        lm.model.norm = RMSNorm(HIDDEN)
        lm.output = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        self.language_model = lm

    def forward(self, input_ids, attention_mask, pixel_values, use_cache=False):
        h = self.language_model.model.tok_embeddings(input_ids)  # [b, T, C]
        features = self.mlp1(self.vision_model(pixel_values))  # [b, n_img_tokens, C]
        h = h.masked_scatter((input_ids == self.img_context_id)[..., None], features)
        t = input_ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        mask = causal[None, None] & attention_mask[:, None, None, :].bool()  # [b, 1, T, T]
        for layer in self.language_model.model.layers:
            h = layer(h, attention_mask=mask, position_ids=None, past_key_value=None, use_cache=use_cache)[0]
        return types.SimpleNamespace(logits=self.language_model.output(self.language_model.model.norm(h)))


@pytest.fixture(scope="module")
def tok():
    return tokenizer(["<IMG_CONTEXT>", "<img>", "</img>", "<|im_end|>"], eos="<|im_end|>", pad="<pad>")


def toy(tok, seed=0):
    torch.manual_seed(seed)
    return InternVLChatToy(tok.convert_tokens_to_ids("<IMG_CONTEXT>")).eval()


def calibration(tok, n=3):
    """Hand-built samples: <img> + 6 x <IMG_CONTEXT> + </img>, a prompt, an answer ending in <|im_end|>."""
    g = torch.Generator().manual_seed(1)
    img, ctx, end_img, eos = (tok.convert_tokens_to_ids(t) for t in ("<img>", "<IMG_CONTEXT>", "</img>", "<|im_end|>"))
    samples = []
    for i in range(n):
        prompt = torch.randint(10, VOCAB - 1, (4 + i,), generator=g).tolist()
        answer = torch.randint(10, VOCAB - 1, (5,), generator=g).tolist() + [eos]
        ids = torch.tensor([img] + [ctx] * 6 + [end_img] + prompt + answer)
        roles = torch.full(ids.shape, PROMPT, dtype=torch.int8)
        roles[ids == ctx] = VISION
        roles[-len(answer) :] = ANSWER
        inputs = {
            "input_ids": ids[None],
            "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long),
            "pixel_values": torch.randn(1, 6, 12, generator=g),
        }
        samples.append(Sample(f"s{i}", inputs, roles))
    return CalibrationSet(samples, pad_token_id=tok.pad_token_id)


def test_entry_maps_the_internlm2_tree(tok):
    model = toy(tok)
    fam = family_for(model)
    assert fam.name == "internvl2-internlm2" and fam.remote_code
    layer = fam.decoder_layers(model)[0]
    assert [g.name for g in fam.active_groups(layer)] == ["attn_in", "mlp_in", "mlp_out"]  # no v->o: fused, GQA
    assert get_module(layer, "attention.wqkv").weight.shape == ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
    for path in fam.keep_fp:
        model.get_submodule(path)
    assert fam.vision_token_id(model, tok) == tok.convert_tokens_to_ids("<IMG_CONTEXT>")


@torch.no_grad()
def test_folding_random_scales_keeps_the_logits(tok):
    model, batch = toy(tok), next(calibration(tok).batches(3))
    before = model(**batch.inputs).logits
    fam = family_for(model)
    g = torch.Generator().manual_seed(0)
    for layer in fam.decoder_layers(model):
        for group in fam.active_groups(layer):
            lins = [get_module(layer, p) for p in group.linears]
            fold_scales_(get_module(layer, group.prev), lins, torch.exp(torch.randn(lins[0].in_features, generator=g)))
    after = model(**batch.inputs).logits
    real = batch.inputs["attention_mask"].bool()
    assert (after - before)[real].norm() / before[real].norm() < 1e-4


@pytest.mark.parametrize(
    "config",
    [
        qig.RTNConfig(wbits=4, group_size=32),
        qig.AWQConfig(wbits=4, group_size=32, n_grid=4),
        qig.QIGConfig(wbits=4, group_size=32, n_grid=4),
        qig.QIGConfig(wbits=4, abits=8, group_size=None, n_grid=4),
    ],
    ids=["rtn", "awq", "qig", "qig-w4a8"],
)
def test_quantize_runs_through_the_tuple_returning_layers(tok, config):
    model, calib = toy(tok), calibration(tok)
    vision_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    result = qig.quantize(model, config, None if config.name == "rtn" else calib, progress=False)
    if config.name != "rtn":
        assert {(g.layer, g.group) for g in result.groups} == {
            (i, g) for i in range(2) for g in ("attn_in", "mlp_in", "mlp_out")
        }
    w2 = model.language_model.model.layers[1].feed_forward.w2.weight.detach()
    assert max(len(torch.unique(row)) for row in w2.reshape(-1, config.group_size or INTER)) <= 16
    assert all(torch.equal(v, vision_before[k]) for k, v in model.vision_model.state_dict().items())
    with torch.no_grad():
        assert torch.isfinite(model(**next(calib.batches(3)).inputs).logits).all()


def test_remote_code_runs_only_when_asked(tmp_path):
    config = {
        "model_type": "internvl_chat",
        "vision_config": {},
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(QigError, match="ships its own modelling code .*--trust-remote-code"):
        load_model_and_processor(tmp_path)
