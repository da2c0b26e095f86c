"""The shipped embedded model: offline load, processor pieces, size."""

import torch

from qig import embedded
from qig.embedded import world
from qig.evaluate import load_model_and_processor


def test_loads_offline_with_auto_classes():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = embedded.default_model_dir()
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_config.model_type == "siglip_vision_model"
    text = model.config.text_config
    assert text.model_type == "qwen2"
    assert text.hidden_size >= 256 and text.num_hidden_layers >= 6
    assert text.num_key_value_heads < text.num_attention_heads  # GQA
    assert processor.tokenizer.chat_template


def test_checkpoint_is_small_and_half_precision():
    path = embedded.default_model_dir()
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert 0 < size <= 40 * 2**20
    from safetensors import safe_open

    with safe_open(str(next(path.glob("*.safetensors"))), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes <= {torch.float16, torch.bfloat16}


def test_processor_expands_one_image_to_one_token_per_patch():
    model, processor = load_model_and_processor()
    image, rec = world.generate("eval", 1, seed=0)[0]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "where is the red circle?"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[image], return_tensors="pt")
    n_image = int((enc["input_ids"] == model.config.image_token_id).sum())
    assert n_image == (world.IMAGE_SIZE // world.CELL) ** 2
    assert enc["pixel_values"].shape == (1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)


def test_tokenizer_round_trips_world_text():
    tok = embedded.build_tokenizer()
    for _, rec in world.generate("calib", 5, seed=0) + world.generate("eval", 20, seed=0):
        for turn in rec["conversations"]:
            ids = tok(turn["value"]).input_ids
            assert tok.unk_token_id not in ids, turn["value"]
