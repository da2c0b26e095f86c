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

from pathlib import Path

from qig import world

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
    return Path(__file__).resolve().parent / "assets" / "tiny-lvlm"


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
