"""llm-compressor's side of ``benchmarks/vs_llmcompressor.py``: one ``oneshot`` run, in the peer venv.

Run by ``.venv-peer/bin/python`` (``scripts/peer_env.sh``), never by qig's venv; it imports no qig module.
Written the way llm-compressor's own examples have a user write it (examples/awq/, examples/quantization_w4a16/,
examples/multimodal_vision/): the model and processor from transformers, the calibration records rendered with
the processor's chat template into a ``datasets.Dataset``, a recipe of modifiers with the scheme presets where one
exists (W4A16_ASYM) and a custom ``config_groups`` scheme where none does (W3, W2 per channel), ``oneshot``, then
``save_pretrained(..., save_compressed=True)``. Two patches are needed on this model; each is marked PATCH below.

    .venv-peer/bin/python benchmarks/_llmc_child.py --model M --calib data.json --order order.json \\
        --rendered rendered.safetensors --modifier awq --wbits 4 --group-size 128 --output out

Before calibrating it checks that its rendering equals qig's, sample by sample (input ids, pixel values, the
answer-only loss mask), from ``--rendered`` (written by the parent from qig's own rendering); any difference
stops it with exit code 3. The last stdout line is ``LLMC {"phases": {...}, "versions": {...}}``.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

MARK = "LLMC "
MISMATCH = 3
# PATCH 1 of 2: AWQ's default mappings (llmcompressor.modifiers.transform.awq.mappings.default_mappings, used for
# LlavaForConditionalGeneration, which has no entry of its own) are bare regexes such as "re:.*input_layernorm$" and
# "re:.*v_proj$" that also match the SigLIP vision tower's layer norms and projections; limited to the language
# model here, as qig's model family does (its scale groups live in the decoder layers only).
LM = "re:.*language_model.*"
IGNORE = ["re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]


def lm_mappings():
    from llmcompressor.modifiers.transform.awq import AWQMapping

    return [
        AWQMapping(f"{LM}input_layernorm$", [f"{LM}q_proj$", f"{LM}k_proj$", f"{LM}v_proj$"]),
        AWQMapping(f"{LM}v_proj$", [f"{LM}o_proj$"]),
        AWQMapping(f"{LM}post_attention_layernorm$", [f"{LM}gate_proj$", f"{LM}up_proj$"]),
        AWQMapping(f"{LM}up_proj$", [f"{LM}down_proj$"]),
    ]


def patch_pin_memory() -> None:
    """PATCH 2 of 2: AWQ pins its activation cache (IntermediatesCache.pin_memory) for faster host-to-device copies;
    ``Tensor.pin_memory`` raises without an accelerator, so on a CPU-only machine it is made a no-op."""
    import torch

    if not torch.accelerator.is_available():
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def recipe(modifier: str, wbits: int, group_size: int | None):
    """The recipe: a preset scheme where llm-compressor has one (W4A16_ASYM), else a custom config_groups scheme."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    if wbits == 4 and group_size == 128:
        quant = {"scheme": "W4A16_ASYM"}  # asymmetric min-max, group 128: qig's weight-only quantizer
    else:
        weights = {"num_bits": wbits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group_size}
        if group_size is None:
            weights = {**weights, "strategy": "channel", "group_size": None}
        quant = {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    if modifier == "gptq":
        return [GPTQModifier(targets=["Linear"], ignore=IGNORE, **quant)]
    return [AWQModifier(mappings=lm_mappings()), QuantizationModifier(targets=["Linear"], ignore=IGNORE, **quant)]


def render(processor, calib: Path, order: list[str]) -> list[dict]:
    """The records in ``order`` rendered as llm-compressor's VLM examples do, with the answer-only loss mask."""
    import torch
    from PIL import Image

    records = {r["id"]: r for r in json.loads(calib.read_text())}
    eos = processor.tokenizer.eos_token_id
    rows = []
    for sid in order:
        rec = records[sid]
        question = rec["conversations"][0]["value"].replace("<image>", "").strip()
        answer = rec["conversations"][1]["value"]
        image = Image.open(calib.parent / rec["image"]).convert("RGB")
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        messages = [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=False)
        enc = processor(text=[text], images=[image], return_tensors="pt")
        prompt = processor.apply_chat_template([user], add_generation_prompt=True)
        start = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
        ids = enc["input_ids"][0]
        ends = (ids[start:] == eos).nonzero()
        end = start + int(ends[0]) + 1 if len(ends) else ids.numel()  # the reply, its end token included
        mask = torch.zeros_like(ids)
        mask[start:end] = 1
        rows.append({"id": sid, **{k: v[0] for k, v in enc.items()}, "loss_mask": mask})
    return rows


def check_same(rows: list[dict], rendered: Path) -> None:
    """Stop (exit 3) unless every sample's input ids, pixel values and loss mask equal qig's rendering."""
    from safetensors.torch import load_file

    theirs = load_file(rendered)
    for i, row in enumerate(rows):
        for key in ("input_ids", "pixel_values", "loss_mask"):
            want = theirs[f"{i}.{key}"]
            if row[key].shape != want.shape or not bool((row[key].to(want.dtype) == want).all()):
                print(
                    f"rendering differs from qig's at sample {i} ({row['id']}), {key}: {tuple(row[key].shape)} vs "
                    f"{tuple(want.shape)}; the two tools would not calibrate on the same inputs",
                    file=sys.stderr,
                )
                raise SystemExit(MISMATCH)


def collate(pad_id: int):
    """Right-pad a batch of rendered samples (llm-compressor's default collator truncates instead)."""
    import torch

    def fn(batch: list[dict]) -> dict:
        length = max(len(b["input_ids"]) for b in batch)
        out = {"input_ids": [], "attention_mask": [], "loss_mask": []}
        for b in batch:
            pad = length - len(b["input_ids"])
            out["input_ids"].append(torch.tensor(b["input_ids"] + [pad_id] * pad))
            out["attention_mask"].append(torch.tensor(b["attention_mask"] + [0] * pad))
            out["loss_mask"].append(torch.tensor(b["loss_mask"] + [0] * pad))
        out = {k: torch.stack(v) for k, v in out.items()}
        out["pixel_values"] = torch.stack([torch.tensor(b["pixel_values"]) for b in batch])
        return out

    return fn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in ("--model", "--calib", "--order", "--rendered", "--output"):
        p.add_argument(flag, required=True)
    p.add_argument("--modifier", choices=["awq", "gptq"], required=True)
    p.add_argument("--wbits", type=int, required=True)
    p.add_argument("--group-size", type=int, default=None, help="none: per output channel")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    phases = {}
    t = time.perf_counter()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForImageTextToText, AutoProcessor

    patch_pin_memory()
    phases["import"] = time.perf_counter() - t
    t = time.perf_counter()
    # float32: the embedded model ships in float16, which CPUs compute ~10x slower; qig computes in float32 too
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.model)
    phases["load"] = time.perf_counter() - t
    t = time.perf_counter()
    rows = render(processor, Path(args.calib), json.loads(Path(args.order).read_text()))
    check_same(rows, Path(args.rendered))
    ds = Dataset.from_list([{k: v.tolist() for k, v in r.items() if k != "id"} for r in rows])
    phases["render"] = time.perf_counter() - t
    t = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe(args.modifier, args.wbits, args.group_size),
        num_calibration_samples=len(rows),
        shuffle_calibration_samples=False,  # qig's order, so both batch the same samples together
        batch_size=args.batch_size,
        data_collator=collate(processor.tokenizer.pad_token_id),
        use_loss_mask=True,  # AWQ's loss over the answer tokens only (ignored by GPTQ)
        sequential_targets=["Qwen2DecoderLayer"],
    )
    phases["oneshot"] = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(args.output, save_compressed=True)
    processor.save_pretrained(args.output)
    phases["save"] = time.perf_counter() - t
    phases["total"] = time.perf_counter() - T0
    import compressed_tensors
    import llmcompressor
    import transformers

    versions = {
        "llmcompressor": llmcompressor.__version__,
        "compressed-tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    print(MARK + json.dumps({"phases": phases, "versions": versions}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
