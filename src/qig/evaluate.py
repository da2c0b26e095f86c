"""Quick visual-QA evaluation: exact-match accuracy and fidelity to a reference.

    >>> from qig.evaluate import run_eval
    >>> report = run_eval(limit=100)  # doctest: +SKIP
    >>> report["accuracy"]  # doctest: +SKIP
    0.98

Greedy generation on the embedded world's eval split (or a LLaVA-style JSON
file), exact match after lower-casing and trimming. With a reference model it
also reports answer agreement and the mean KL(reference || model) of the
next-token distributions at the gold answer's positions (teacher forcing).

A weight-activation model folder (``qig quantize --abits 8``) is loaded by
``qig.loading.load_model_and_processor`` with its per-token activation
quantizers re-installed, so it is evaluated with activations really quantized
at run time.

A model larger than the host or the device can keep its decoder on disk
(:func:`load_for_eval`, ``model_offload="disk"``): each decoder layer is read
onto the device when the model calls it and released after
(``qig.pipeline.layers.stream_calls``), with the answers of the model held
whole. The cost is reading: every forward pass reads the whole decoder once,
so a batch of questions reads it once per new token of its answers (at most
``MAX_NEW_TOKENS`` times, fewer when every answer has ended) and once more for
the reference log-probs; a larger ``batch_size`` reads it fewer times for the
same questions.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from qig.calib import answer_span, chat_texts
from qig.embedded import world
from qig.errors import QigError
from qig.loading import activation_note, load_model_and_processor

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 6


def _messages(question: str, answer: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def _prompt(processor, question: str) -> str:
    """The question rendered with the generation prompt: what the model answers from."""
    return processor.apply_chat_template(_messages(question), tokenize=False, add_generation_prompt=True)


def _question(rec: dict) -> tuple[str, str]:
    conv = rec["conversations"]
    q = conv[0]["value"].replace("<image>", "").strip()
    return q, conv[1]["value"]


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


@torch.no_grad()
def generate_answers(model, processor, records, batch_size: int = 64) -> list[str]:
    """Greedy answers for (image, record) pairs."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    answers = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        texts = [_prompt(processor, _question(rec)[0]) for _, rec in chunk]
        enc = _batch(processor, texts, chunk, model)
        out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new = out[:, enc["input_ids"].shape[1] :]
        answers += [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
    return answers


@torch.no_grad()
def answer_log_probs(model, processor, records, batch_size: int = 64) -> list[torch.Tensor]:
    """Per record, log-probs [n_answer_tokens, vocab] predicting the gold answer and its end token (teacher forcing).

    The answer's positions are found as calibration finds them
    (``qig.calib.answer_span``): the question rendered with the generation
    prompt is a token prefix of the whole conversation, so any family's chat
    template works.
    """
    tok = processor.tokenizer
    tok.padding_side = "left"
    out = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        texts = [chat_texts(processor, _messages(*_question(rec))) for _, rec in chunk]
        enc = _batch(processor, [full for full, _ in texts], chunk, model)
        prompts = _batch(processor, [prompt for _, prompt in texts], chunk)
        logits = model(**enc).logits.float()  # [B, T, V]
        for b, (_, rec) in enumerate(chunk):
            positions = _real_positions(enc, b)  # [T_b] where the conversation's tokens sit (padding aside)
            ids = enc["input_ids"][b, positions].cpu()
            prompt_ids = prompts["input_ids"][b, _real_positions(prompts, b)]
            start, end = answer_span(ids, prompt_ids, tok.eos_token_id, f"record {rec.get('id', i + b)}")
            # logits at position p predict token p+1: answer tokens [start, end) are predicted at [start-1, end-1).
            out.append(torch.log_softmax(logits[b, positions[start - 1 : end - 1]], dim=-1).cpu())
    return out


def _batch(processor, texts: list[str], chunk, model=None):
    """A padded batch of texts, each with its record's image (one list per sample, as Gemma 3 and SmolVLM need).

    With ``model``: on its device, the pixels in its dtype.
    """
    enc = processor(text=texts, images=[[img] for img, _ in chunk], return_tensors="pt", padding=True)
    if model is None:
        return enc
    param = next(model.parameters())
    enc = enc.to(param.device)
    enc["pixel_values"] = enc["pixel_values"].to(param.dtype)
    return enc


def _real_positions(enc, b: int) -> torch.Tensor:
    """Positions of row ``b``'s real tokens in a padded batch (left or right padding)."""
    mask = enc.get("attention_mask")
    if mask is None:
        return torch.arange(enc["input_ids"].shape[1], device=enc["input_ids"].device)
    return mask[b].bool().nonzero().squeeze(1)


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


def load_for_eval(
    model_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    model_offload: str = "none",
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
):
    """The model and processor as evaluation runs them: whole on ``device``, or with the decoder read from disk.

    model_offload: "none" loads every weight; "disk" keeps the decoder layers on
    disk and reads each onto ``device`` when the model calls it (see the module
    doc for the cost); "auto" does that when the checkpoint passes a quarter of
    the host's available memory (``qig.loading.load_plan``'s rule).

        >>> model, processor = load_for_eval("out/qig-w4", "cuda", model_offload="disk")  # doctest: +SKIP
    """
    from qig.hub import resolve_model
    from qig.loading import load_plan
    from qig.pipeline.layers import stream_calls

    path = resolve_model(model_dir, revision, trust_remote_code).path
    if load_plan("float32", path, device, model_offload).decoder == "memory":
        return load_model_and_processor(path, device, dtype=dtype, trust_remote_code=trust_remote_code)
    model, processor = load_model_and_processor(
        path, "cpu", dtype=dtype, trust_remote_code=trust_remote_code, decoder="disk"
    )
    stream_calls(model, torch.device(device))
    log.info("%s: decoder layers read from disk, one at a time, as the model calls them", path)
    return model, processor


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
    revision: str | None = None,
    model_offload: str = "none",
) -> dict:
    """Evaluate a model folder or hub id on the world's eval split (or ``data``); see module doc.

    ``blank_images`` replaces every image by an empty background (same noise
    level), to show how much the answers depend on the image. ``reference``:
    a reference's outputs on the same questions, computed once
    (``reference_outputs``), instead of ``reference_dir``. ``model_offload``:
    where the decoder layers of the model and of ``reference_dir`` are read from
    (:func:`load_for_eval`).
    """
    model, processor = load_for_eval(model_dir, device, model_offload, revision)
    if data is not None:
        records = load_records(data, image_folder, limit)
    else:
        records = eval_split(seed, limit, n)
    if blank_images:
        records = [(world.blank_image(seed + i), rec) for i, (_, rec) in enumerate(records)]
    if reference_dir is not None:
        reference = load_for_eval(reference_dir, device, model_offload)
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
