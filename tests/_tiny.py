"""Tiny random LLaVA models for the tests (a SigLIP tower + a small Qwen2 decoder)."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def processor():
    from qig.embedded import build_processor

    return build_processor()


def tiny_llava(seed: int = 0, layers: int = 2, kv_heads: int = 2, hidden: int = 128, outliers: bool = False):
    """A random tiny LLaVA that reads the embedded world's images (36 image tokens).

    kv_heads=4 gives multi-head attention (the v->o group exists); 2 gives GQA.
    outliers=True applies a function-preserving outlier-channel rescaling (norm
    weights up on a few channels, the following linears' columns down), which
    makes weight quantization fragile the way real LVLMs are.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    from qig.embedded import IMAGE_TOKEN, world

    tok = processor().tokenizer
    torch.manual_seed(seed)
    text = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=world.IMAGE_SIZE,
        patch_size=world.CELL,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=36,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config).eval()
    if outliers:
        add_outlier_channels_(model, seed)
    return model


@torch.no_grad()
def add_outlier_channels_(model, seed: int = 0, n: int = 4, factor: float = 30.0) -> None:
    """Scale n channels of every norm up by ``factor`` and the following linears' columns down."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.language_model.layers:
        for norm, lins in (
            (layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
            (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]),
        ):
            idx = torch.randperm(norm.weight.numel(), generator=g)[:n]
            norm.weight[idx] *= factor
            for lin in lins:
                lin.weight[:, idx] /= factor


def calibration(n: int = 8, seed: int = 0):
    from qig.calib import embedded_calibration

    return embedded_calibration(processor(), n_samples=n, seed=seed, image_seq_length=36)


@torch.no_grad()
def fold_random_scales_(model, seed: int = 0) -> None:
    """Fold random per-channel scales (spanning ~e^+-3) into every scale group of every decoder layer."""
    from qig.models import family_for, get_module
    from qig.quant.fold import fold_scales_

    fam = family_for(model)
    g = torch.Generator().manual_seed(seed)
    for layer in fam.decoder_layers(model):
        for group in fam.active_groups(layer):
            lins = [get_module(layer, p) for p in group.linears]
            s = torch.exp(torch.randn(lins[0].in_features, generator=g))
            fold_scales_(get_module(layer, group.prev), lins, s, offset=group.prev_offset)
