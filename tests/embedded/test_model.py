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


def test_planting_outlier_channels_keeps_the_function_and_plants_the_ratio():
    from qig.calib import embedded_calibration

    model, processor = load_model_and_processor()
    batch = next(embedded_calibration(processor, n_samples=8).batches(8)).inputs
    with torch.no_grad():
        before = model(**batch).logits
    factors = embedded.plant_outlier_channels(model, batch, n_hidden=4, n_intermediate=8, ratio=50.0)
    assert {k.split(".", 1)[1] for k in factors} == {"attn_in", "mlp_in", "mlp_out"}  # the family's scale groups
    captured = {}
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    handle = q_proj.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        after = model(**batch).logits
    handle.remove()
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    m = captured["x"].abs().reshape(-1, captured["x"].shape[-1])[batch["attention_mask"].reshape(-1).bool()].mean(0)
    planted = [int(c) for c, alpha in factors["0.attn_in"].items() if alpha > 1.0]
    assert planted and all(m[c] >= 0.99 * 50.0 * m.median() for c in planted)
