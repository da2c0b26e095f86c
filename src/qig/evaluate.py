"""Quick visual-QA evaluation: exact-match accuracy and fidelity to a reference.

    >>> from qig.evaluate import run_eval
    >>> report = run_eval(limit=100)  # doctest: +SKIP
    >>> report["accuracy"]  # doctest: +SKIP
    0.98

Greedy generation on the embedded world's eval split (or a LLaVA-style JSON
file), exact match after lower-casing and trimming. With a reference model it
also reports answer agreement and the mean KL(reference || model) of the
next-token distributions at the gold answer's positions (teacher forcing).

A weight-activation model folder (``qig quantize --abits 8``: its config.json
has a ``qig_quantization`` entry with ``abits`` below 16) is loaded with its
per-token activation quantizers re-installed on the decoder linears, so it is
evaluated with activations really quantized at run time.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from qig.embedded import world
from qig.errors import QigError

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 6


def load_model_and_processor(
    model_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype=torch.float32,
    trust_remote_code: bool = False,
):
    """Load an LVLM and its processor from a local folder (offline); default: the embedded model.

    A folder that ships its own modelling code (``auto_map`` in config.json, e.g.
    InternVL2) is loaded only with ``trust_remote_code=True``.

    A W-A quantized folder gets its activation quantizers back (see the module doc).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qig.embedded import default_model_dir

    path = Path(model_dir) if model_dir is not None else default_model_dir()
    if not path.is_dir():
        problem = "is a file, not a folder" if path.exists() else "does not exist"
        raise QigError(f"model folder {path} {problem}; pass --model with a folder written by save_pretrained")
    if not (path / "config.json").is_file():
        raise QigError(f"{path} has no config.json; it is not a transformers model folder")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QigError(f"{path / 'config.json'} is not valid JSON ({exc}); the model folder is corrupt") from exc
    if "vision_config" not in config:
        raise QigError(
            f"{path} holds a {config.get('model_type', 'unknown')!r} model without a vision tower; "
            "qig needs a vision-language model (e.g. llava, qwen2_vl, idefics3)"
        )
    auto_map = config.get("auto_map") or {}
    if auto_map and not trust_remote_code:
        raise QigError(
            f"{path} ships its own modelling code ({', '.join(sorted(set(auto_map.values())))}); qig runs it only "
            "with --trust-remote-code (read that code first), or use an HF-native conversion of the checkpoint"
        )
    auto_model = AutoModelForImageTextToText
    if auto_map and "AutoModelForImageTextToText" not in auto_map:
        from transformers import AutoModel as auto_model
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        model = auto_model.from_pretrained(
            path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except QigError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise QigError(f"could not load the model in {path}: {exc.__class__.__name__}: {exc}") from exc
    abits = _saved_abits(config, path)
    if abits < 16:
        from qig.pipeline import install_activation_quantizers
        from qig.quant.spec import activation_spec

        n = install_activation_quantizers(model, activation_spec(abits))
        log.info("%s: W-A model, activations quantized at run time (per token, %d bits) on %d linears", path, abits, n)
    return model.to(device).eval(), processor


def _saved_abits(config: dict, path: Path) -> int:
    """The activation bits recorded by ``qig quantize`` in config.json (16 when none are recorded)."""
    from qig.api import CONFIG_KEY

    entry = config.get(CONFIG_KEY)
    if entry is None:
        return 16
    abits = entry.get("abits", 16) if isinstance(entry, dict) else None
    if not isinstance(abits, int) or isinstance(abits, bool) or not 4 <= abits <= 16:
        raise QigError(
            f"{path / 'config.json'}: {CONFIG_KEY}.abits must be an integer from 4 to 16, got {abits!r}; "
            "re-run qig quantize, or remove the entry to load the weights without activation quantization"
        )
    return abits


def activation_note(model) -> str | None:
    """How the model quantizes its activations at run time, in words; None when it does not."""
    from qig.pipeline import activation_quantization

    found = activation_quantization(model)
    if found is None:
        return None
    spec, n = found
    return f"activations quantized at run time: per-token symmetric {spec.bits}-bit on {n} decoder linears"


def _prompt(processor, question: str, answer: str | None = None) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answer is None)


def _question(rec: dict) -> tuple[str, str]:
    conv = rec["conversations"]
    q = conv[0]["value"].replace("<image>", "").strip()
    return q, conv[1]["value"]


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


@torch.no_grad()
def generate_answers(model, processor, records, batch_size: int = 64) -> list[str]:
    """Greedy answers for (image, record) pairs."""
    device = next(model.parameters()).device
    tok = processor.tokenizer
    tok.padding_side = "left"
    answers = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        texts = [_prompt(processor, _question(rec)[0]) for _, rec in chunk]
        enc = processor(text=texts, images=[img for img, _ in chunk], return_tensors="pt", padding=True).to(device)
        enc["pixel_values"] = enc["pixel_values"].to(next(model.parameters()).dtype)
        out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new = out[:, enc["input_ids"].shape[1] :]
        answers += [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
    return answers


@torch.no_grad()
def answer_log_probs(model, processor, records, batch_size: int = 64) -> list[torch.Tensor]:
    """Per record, log-probs [n_answer_tokens, vocab] predicting the gold answer (teacher forcing)."""
    device = next(model.parameters()).device
    tok = processor.tokenizer
    tok.padding_side = "left"
    end = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        texts = [_prompt(processor, *_question(rec)) for _, rec in chunk]
        enc = processor(text=texts, images=[img for img, _ in chunk], return_tensors="pt", padding=True).to(device)
        enc["pixel_values"] = enc["pixel_values"].to(next(model.parameters()).dtype)
        logits = model(**enc).logits.float()  # [B, T, V]
        n_answer = [len(tok(_question(rec)[1]).input_ids) + 1 for _, rec in chunk]  # + <|im_end|>
        ids = enc["input_ids"]
        for b, n in enumerate(n_answer):
            last_end = max(j for j, t in enumerate(ids[b].tolist()) if t == end)
            # logits at position p predict token p+1; answer tokens are (last_end-n, last_end].
            out.append(torch.log_softmax(logits[b, last_end - n : last_end], dim=-1).cpu())
    return out


@dataclass(frozen=True)
class ReferenceOutputs:
    """What fidelity compares against: a reference model's greedy answers and answer-token log-probs."""

    answers: list[str]
    log_probs: list[torch.Tensor]


def reference_outputs(model, processor, records, batch_size: int = 64) -> ReferenceOutputs:
    """Compute a reference's outputs once, to score several models against it (``evaluate_records``)."""
    return ReferenceOutputs(
        generate_answers(model, processor, records, batch_size), answer_log_probs(model, processor, records, batch_size)
    )


def evaluate_records(model, processor, records, batch_size: int = 64, reference=None) -> dict:
    """Accuracy overall and per question type; fidelity if ``reference`` is ``(model, processor)`` or
    ``ReferenceOutputs`` of the same records."""
    preds = generate_answers(model, processor, records, batch_size)
    per_type: dict[str, list[int]] = defaultdict(list)
    rows = []
    for (_, rec), pred in zip(records, preds, strict=True):
        gold = _question(rec)[1]
        ok = int(normalize_answer(pred) == normalize_answer(gold))
        per_type[rec.get("type", "all")].append(ok)
        rows.append({"id": rec["id"], "type": rec.get("type"), "answer": gold, "prediction": pred, "correct": ok})
    n = len(rows)
    report = {
        "accuracy": sum(r["correct"] for r in rows) / max(n, 1),
        "n": n,
        "per_type": {
            k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(per_type.items(), key=lambda kv: kv[0])
        },
    }
    if reference is not None:
        if not isinstance(reference, ReferenceOutputs):
            reference = reference_outputs(*reference, records, batch_size)
        ref_preds, lp_ref = reference.answers, reference.log_probs
        agree = [normalize_answer(a) == normalize_answer(b) for a, b in zip(preds, ref_preds, strict=True)]
        lp = answer_log_probs(model, processor, records, batch_size)
        kls = [(r.exp() * (r - m)).sum(-1).mean().item() for m, r in zip(lp, lp_ref, strict=True)]
        report["fidelity"] = {"agreement": sum(agree) / max(n, 1), "kl": sum(kls) / max(n, 1)}
        for row, rp in zip(rows, ref_preds, strict=True):
            row["reference_prediction"] = rp
    report["predictions"] = rows
    return report


def load_records(path: str | os.PathLike, image_folder: str | os.PathLike | None = None, limit: int | None = None):
    """Read a LLaVA-style QA JSON list and its images as (PIL image, record) pairs."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise QigError(f"eval file {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise QigError(f"eval file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list) or not data:
        raise QigError(f"eval file {path} must hold a non-empty JSON list of records")
    folder = Path(image_folder) if image_folder is not None else path.parent
    out = []
    for i, rec in enumerate(data[:limit] if limit else data):
        if not isinstance(rec, dict) or "image" not in rec or len(rec.get("conversations", [])) < 2:
            raise QigError(f"record {i} of {path} needs 'image' and two 'conversations' turns")
        try:
            image = Image.open(folder / rec["image"]).convert("RGB")
        except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
            raise QigError(f"record {rec.get('id', i)}: cannot read image {folder / rec['image']}: {exc}") from exc
        out.append((image, rec))
    return out


def eval_split(seed: int = world.DEFAULT_EVAL_SEED, limit: int | None = None, n: int = 1000):
    """The world's eval questions ``run_eval`` scores: ``n`` of them, or ``limit`` if fewer."""
    return world.generate("eval", min(n, limit) if limit else n, seed)


def run_eval(
    model_dir: str | os.PathLike | None = None,
    seed: int = world.DEFAULT_EVAL_SEED,
    limit: int | None = None,
    n: int = 1000,
    reference_dir: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    image_folder: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    blank_images: bool = False,
    reference: ReferenceOutputs | None = None,
) -> dict:
    """Evaluate a model folder on the world's eval split (or ``data``); see module doc.

    ``blank_images`` replaces every image by an empty background (same noise
    level), to show how much the answers depend on the image. ``reference``:
    a reference's outputs on the same questions, computed once
    (``reference_outputs``), instead of ``reference_dir``.
    """
    model, processor = load_model_and_processor(model_dir, device)
    if data is not None:
        records = load_records(data, image_folder, limit)
    else:
        records = eval_split(seed, limit, n)
    if blank_images:
        records = [(world.blank_image(seed + i), rec) for i, (_, rec) in enumerate(records)]
    if reference_dir is not None:
        reference = load_model_and_processor(reference_dir, device)
    report = evaluate_records(model, processor, records, batch_size, reference)
    report["activations"] = activation_note(model)
    report["model"] = str(model_dir) if model_dir is not None else "embedded"
    report["seed"] = seed if data is None else None
    report["reference"] = str(reference_dir) if reference_dir is not None else None
    report["blank_images"] = blank_images
    return report


def format_table(report: dict) -> str:
    lines = [report["activations"]] if report.get("activations") else []
    lines.append(f"{'type':<10} {'n':>5} {'accuracy':>9}")
    for k, v in report["per_type"].items():
        lines.append(f"{k:<10} {v['n']:>5} {100 * v['accuracy']:>8.1f}%")
    lines.append(f"{'overall':<10} {report['n']:>5} {100 * report['accuracy']:>8.1f}%")
    if "fidelity" in report:
        f = report["fidelity"]
        lines.append(f"agreement with reference {100 * f['agreement']:.1f}%   mean KL {f['kl']:.4g}")
    return "\n".join(lines)
