"""The embedded default model: a tiny LLaVA (SigLIP tower + Qwen2 GQA decoder).

It is built only from transformers' own classes, so it goes through exactly
the code path of a real LLaVA-OneVision-style checkpoint. The trained
checkpoint ships inside the package (``qig/assets/tiny-lvlm``) and is the
default ``--model`` of every command.

    >>> from qig.embedded import default_model_dir
    >>> (default_model_dir() / "config.json").exists()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
from pathlib import Path

from qig.embedded import world

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
ROLES = ["system", "user", "assistant"]

# ChatML, the template of Qwen2 and LLaVA-OneVision. Content may be a string or
# a list of {"type": "image"} / {"type": "text", "text": ...} items.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DECODER = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in LLaVA-OneVision's Qwen2
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
VISION = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=world.IMAGE_SIZE,
    patch_size=world.CELL,
    num_channels=3,
)


def default_model_dir() -> Path:
    """Folder of the shipped, trained embedded checkpoint."""
    return Path(__file__).resolve().parent.parent / "assets" / "tiny-lvlm"


def is_embedded_model(folder: str | os.PathLike | None) -> bool:
    """Whether ``folder`` is one of the shipped embedded models (None: the default one), the models of the toy world.

    >>> is_embedded_model(None), is_embedded_model(sinks_model_dir()), is_embedded_model("/models/llava-1.5-7b")
    (True, True, False)
    >>> is_embedded_model(vsinks_model_dir())
    True
    """
    if folder is None:
        return True
    path = Path(folder)
    return path.is_dir() and path.resolve().parent == default_model_dir().parent


def sinks_model_dir() -> Path:
    """Folder of the shipped variant with massive activations on sink tokens (``--model`` for that testbed).

    The default checkpoint fine-tuned with a fixed massive offset on the chat template's and the
    punctuation's tokens (``<|im_start|> <|im_end|> . , :``; its model card says how and what it
    measures): the testbed where token weightings can differ.
    """
    return Path(__file__).resolve().parent.parent / "assets" / "tiny-lvlm-sinks"


def vsinks_model_dir() -> Path:
    """Folder of the shipped variant with massive activations on a few vision tokens (``--model`` for that testbed).

    The default checkpoint fine-tuned with a fixed massive offset on the image tokens of two fixed patches
    (visual attention sinks; its model card says how and what it measures): the testbed where one weight
    per modality (MBQ) cannot tell the sink vision tokens from the others.
    """
    return Path(__file__).resolve().parent.parent / "assets" / "tiny-lvlm-vsinks"


def build_tokenizer():
    """Word-level tokenizer over the world's vocabulary, with ChatML special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ROLES + ["\n"] + world.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # The newline is structure of the chat template: matched before pre-tokenization.
    tok.add_tokens([AddedToken("\n", special=False, normalized=False)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=DECODER["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor():
    """LlavaProcessor: SigLIP image processor + the word-level tokenizer + ChatML."""
    from transformers import LlavaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(
        size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=world.CELL,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )


def build_model(tokenizer, seed: int = 0):
    """A randomly initialised tiny LLaVA (SigLIP + Qwen2 GQA) sized for the world."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    torch.manual_seed(seed)
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **DECODER,
    )
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(**VISION),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=(world.IMAGE_SIZE // world.CELL) ** 2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def forward_inputs(model, batch: dict, modules: dict) -> dict:
    """Run ``model(**batch)`` once without gradients; return each module's first input (float32) by its key."""
    import torch

    seen = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, key=key: seen.__setitem__(key, args[0].detach().float()))
        for key, module in modules.items()
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def plant_outlier_channels(
    model,
    batch: dict,
    n_hidden: int = 4,
    n_intermediate: int = 8,
    ratio: float = 40.0,
) -> dict:
    """Give the decoder the activation outlier channels real LLMs have, without changing its function.

    Real LLM/LVLM decoders carry a few hidden channels (well under 1-2% of
    them) whose activations are tens of times larger than the median channel
    at the inputs of q/k/v and gate/up, and a few intermediate channels with
    the same property at the input of down_proj (LLM.int8(), SmoothQuant, AWQ
    and MBQ all report it). A model trained from scratch in minutes does not
    grow them, which makes it unrealistically robust to weight quantization.

    This rescaling plants them through the model's own scale groups (the
    family map) and the same fold a search uses (``fold_scales_`` with
    ``s = 1 / alpha``): for ``n_hidden`` hidden channels (the ones with the
    largest mean |x| in the residual stream, shared by every layer as in real
    models) each group behind a norm gets its norm weight multiplied by
    ``alpha_c`` and its linears' input columns divided by it, so that the
    channel's mean |x| at the linear inputs becomes ``ratio`` times the median
    channel's; a group behind a linear (up -> down) does the same for its own
    ``n_intermediate`` largest channels. Exact in real arithmetic (the folds
    keep the function); float rounding only. Returns the factors by
    ``"layer.group"``.
    """
    import torch

    from qig.models import family_for, get_module
    from qig.quant.fold import fold_scales_

    family = family_for(model)
    layers = family.decoder_layers(model)
    mask = batch["attention_mask"].reshape(-1).bool()
    modules = {}
    for i, layer in enumerate(layers):
        modules[(i, "resid")] = layer
        for g in family.active_groups(layer):
            modules[(i, g.name)] = get_module(layer, g.linears[0])
    # (layer, group or "resid") -> mean |x| per channel [C] over the real tokens
    inputs = forward_inputs(model, batch, modules)
    stats = {k: x.abs().reshape(-1, x.shape[-1])[mask].mean(0) for k, x in inputs.items()}

    resid = torch.stack([stats[(i, "resid")] for i in range(len(layers))]).mean(0)  # [C]
    hidden_channels = torch.argsort(resid, descending=True)[:n_hidden]
    factors = {}
    for i, layer in enumerate(layers):
        for g in family.active_groups(layer):
            m, prev = stats[(i, g.name)], get_module(layer, g.prev)
            behind_norm = prev.weight.dim() == 1
            chans = hidden_channels if behind_norm else torch.argsort(m, descending=True)[:n_intermediate]
            alpha = (ratio * m.median() / m[chans]).clamp(min=1.0)  # [n]
            s = torch.ones_like(m)
            s[chans] = 1.0 / alpha
            fold_scales_(prev, [get_module(layer, p) for p in g.linears], s, offset=g.prev_offset)
            factors[f"{i}.{g.name}"] = dict(zip(chans.tolist(), alpha.tolist(), strict=True))
    return factors
