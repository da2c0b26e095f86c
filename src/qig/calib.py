"""Calibration data: conversations rendered by the model's own processor, with a role per token.

Accepted inputs (METHOD.md section 1):

- LLaVA / ShareGPT4V records, as a JSON list or JSONL, plus an image folder::

    {"id": "x", "image": "images/x.png",
     "conversations": [{"from": "human", "value": "<image>\\ndescribe the image."},
                       {"from": "gpt", "value": "two objects: ..."}]}

  ``image`` may be a list; records without ``image`` are text conversations.
- plain text JSONL, one ``{"text": "..."}`` per line: the whole text is
  treated as the answer (a language-model calibration sample).

Each token gets a role: ``vision`` (image placeholder positions after
expansion), ``answer`` (the last assistant reply, up to and including the end
token), ``prompt`` (other real tokens) and ``pad``. The answer span is found
through the chat template itself: the conversation rendered without its last
reply and with ``add_generation_prompt=True`` is a token prefix of the full
rendering, so this works for any family's template.

    >>> from qig.calib import embedded_calibration
    >>> from qig.embedded import build_processor
    >>> calib = embedded_calibration(build_processor(), n_samples=4)  # doctest: +SKIP
    >>> calib.roles.shape  # doctest: +SKIP
    torch.Size([4, 80])
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qig.errors import QigError

log = logging.getLogger(__name__)

PAD, PROMPT, VISION, ANSWER = 0, 1, 2, 3
ROLE_NAMES = {PAD: "pad", PROMPT: "prompt", VISION: "vision", ANSWER: "answer"}
IMAGE_PLACEHOLDER = "<image>"
DEFAULT_N_SAMPLES = 128
DEFAULT_MAX_LENGTH = 1024
_SEQUENCE_KEYS = ("input_ids", "attention_mask")  # padded with pad_token_id / 0


@dataclass
class Sample:
    """One rendered conversation: processor outputs with batch dim 1, and roles [T]."""

    id: str
    inputs: dict[str, torch.Tensor]
    roles: torch.Tensor  # [T] int8


@dataclass
class CalibBatch:
    """A right-padded batch: model inputs, roles [b, T] and sample ids."""

    inputs: dict[str, torch.Tensor]
    roles: torch.Tensor
    ids: list[str]


@dataclass
class CalibrationSet:
    """Rendered calibration samples, all padded (on the right) to one length ``seq_len``."""

    samples: list[Sample]
    pad_token_id: int
    seq_len: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.samples:
            raise QigError("the calibration set is empty; give at least one sample")
        self.seq_len = max(s.roles.numel() for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def roles(self) -> torch.Tensor:
        """Roles of all samples, [N, T] int8 (pad = 0)."""
        return torch.stack([_pad_to(s.roles, self.seq_len, PAD) for s in self.samples])

    def batches(self, batch_size: int) -> Iterator[CalibBatch]:
        """Consecutive batches, each padded to ``seq_len`` so every batch has the same T."""
        if batch_size <= 0:
            raise QigError(f"batch size must be positive, got {batch_size}")
        for i in range(0, len(self.samples), batch_size):
            yield self._collate(self.samples[i : i + batch_size])

    def _collate(self, samples: Sequence[Sample]) -> CalibBatch:
        T = self.seq_len
        inputs: dict[str, torch.Tensor] = {}
        for key in samples[0].inputs:
            parts = [s.inputs[key] for s in samples]
            if key in _SEQUENCE_KEYS or (parts[0].dim() == 2 and parts[0].shape[1] == samples[0].roles.numel()):
                fill = self.pad_token_id if key == "input_ids" else 0
                inputs[key] = torch.stack([_pad_to(p[0], T, fill) for p in parts])  # [b, T]
            else:
                inputs[key] = _cat_padded(parts)  # images / patches of the batch, in order
        roles = torch.stack([_pad_to(s.roles, T, PAD) for s in samples])  # [b, T]
        return CalibBatch(inputs, roles, [s.id for s in samples])


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the other dims to the largest (tiles per sample differ).

    Zero padding is what the processors themselves do for a batch: LLaVA-NeXT /
    OneVision pad the tiles of each image, Idefics3 / SmolVLM the images of each
    sample (all-zero images are dropped by the model).
    """
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    padded = []
    for p in parts:
        if list(p.shape[1:]) != shape:
            q = p.new_zeros((p.shape[0], *shape))
            q[tuple(slice(0, n) for n in p.shape)] = p
            p = q
        padded.append(p)
    return torch.cat(padded, dim=0)


def _pad_to(x: torch.Tensor, length: int, fill: int) -> torch.Tensor:
    # x: [T_i] -> [length], right padding
    return torch.cat([x, x.new_full((length - x.numel(),), fill)])


# ---------------------------------------------------------------- entry points


def embedded_calibration(
    processor,
    n_samples: int = DEFAULT_N_SAMPLES,
    seed: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    image_seq_length: int | None = None,
    image_token_id: int | None = None,
) -> CalibrationSet:
    """The embedded world's calibration split (image captions), rendered by ``processor``."""
    from qig.embedded import world

    _check_n(n_samples)
    pairs = world.generate("calib", n_samples, world.DEFAULT_CALIB_SEED if seed is None else seed)
    return from_records(
        pairs, processor, max_length=max_length, image_seq_length=image_seq_length, image_token_id=image_token_id
    )


def load_calibration(
    path: str | os.PathLike,
    processor,
    image_folder: str | os.PathLike | None = None,
    n_samples: int = DEFAULT_N_SAMPLES,
    seed: int = 0,
    max_length: int = DEFAULT_MAX_LENGTH,
    image_seq_length: int | None = None,
    image_token_id: int | None = None,
) -> CalibrationSet:
    """Read a LLaVA-style JSON/JSONL (or plain text JSONL), shuffle with ``seed``, keep ``n_samples``.

    >>> calib = load_calibration("data/calib/data.json", processor, n_samples=64)  # doctest: +SKIP
    """
    _check_n(n_samples)
    path = Path(path)
    records = read_records(path)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if len(records) < n_samples:
        log.warning("%s holds %d records, fewer than n_samples=%d; using all of them", path, len(records), n_samples)
    chosen = [records[i] for i in order[:n_samples]]  # shuffled order, fixed by the seed
    folder = Path(image_folder) if image_folder is not None else path.parent
    pairs = [(_load_images(rec, i, folder, path), rec) for i, rec in chosen]
    return from_records(
        pairs, processor, max_length=max_length, image_seq_length=image_seq_length, image_token_id=image_token_id
    )


def read_records(path: Path) -> list[tuple[int, dict]]:
    """(index, record) pairs of a JSON list or JSONL file, schema-checked."""
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise QigError(f"calibration file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise QigError(f"cannot read calibration file {path}: {exc}") from exc
    if not text.strip():
        raise QigError(f"calibration file {path} is empty; it needs a JSON list or JSONL of records")
    try:
        if text.lstrip().startswith("["):
            data = json.loads(text)
        else:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise QigError(f"calibration file {path} is neither a JSON list nor JSONL: {exc}") from exc
    if not data:
        raise QigError(f"calibration file {path} holds no records")
    for i, rec in enumerate(data):
        _check_schema(rec, i, path)
    return list(enumerate(data))


def _check_schema(rec, i: int, path: Path) -> None:
    where = f"record {i} of {path}"
    if not isinstance(rec, dict):
        raise QigError(f"{where} is a {type(rec).__name__}; expected an object with 'conversations' or 'text'")
    if "text" in rec and "conversations" not in rec:
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise QigError(f"{where}: 'text' must be a non-empty string")
        return
    conv = rec.get("conversations")
    ok_turns = isinstance(conv, list) and all(
        isinstance(t, dict) and isinstance(t.get("value"), str) and t.get("from") in _ROLE_OF for t in conv
    )
    if not ok_turns or len(conv) < 2:
        raise QigError(
            f"{where} (id {rec.get('id', '?')}) needs 'conversations': a list of at least two "
            f"{{'from': 'human'|'gpt', 'value': str}} turns (or a plain {{'text': str}})"
        )
    if _ROLE_OF[conv[-1]["from"]] != "assistant":
        raise QigError(f"{where} (id {rec.get('id', '?')}): the last turn must be the answer ('from': 'gpt')")
    image = rec.get("image")
    if image is not None and not (
        isinstance(image, str) or (isinstance(image, list) and all(isinstance(x, str) for x in image))
    ):
        raise QigError(f"{where} (id {rec.get('id', '?')}): 'image' must be a path or a list of paths")


_ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _load_images(rec: dict, i: int, folder: Path, path: Path):
    from PIL import Image, UnidentifiedImageError

    names = rec.get("image")
    if names is None:
        return None
    names = [names] if isinstance(names, str) else names
    images = []
    for name in names:
        file = folder / name
        try:
            with Image.open(file) as im:
                images.append(im.convert("RGB"))
        except FileNotFoundError as exc:
            raise QigError(
                f"sample {rec.get('id', i)} of {path}: image {file} does not exist (image folder: {folder})"
            ) from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise QigError(f"sample {rec.get('id', i)} of {path}: cannot read image {file}: {exc}") from exc
    return images


# ---------------------------------------------------------------- rendering


def from_records(
    pairs: Sequence[tuple[object, dict]],
    processor,
    max_length: int = DEFAULT_MAX_LENGTH,
    image_seq_length: int | None = None,
    image_token_id: int | None = None,
) -> CalibrationSet:
    """Render (images, record) pairs; images: a PIL image, a list of them, or None (text).

    image_token_id: the token whose positions the model fills with image features
    (``qig.models.family_for(model).vision_token_id(model, processor)``); default:
    the processor's image token. They differ for Gemma 3, whose processor calls the
    begin-of-image marker its image token.
    """
    tok = getattr(processor, "tokenizer", processor)
    if tok.pad_token_id is None:
        raise QigError("the tokenizer has no pad token; set one (e.g. the eos token) before calibrating")
    if image_token_id is None:
        image_token_id = _image_token_id(processor)
    samples = [
        _render(images, rec, i, processor, max_length, image_seq_length, image_token_id)
        for i, (images, rec) in enumerate(pairs)
    ]
    return CalibrationSet(samples, pad_token_id=tok.pad_token_id)


def _render(
    images, rec: dict, i: int, processor, max_length: int, image_seq_length: int | None, image_token_id: int | None
) -> Sample:
    sid = str(rec.get("id", i))
    tok = getattr(processor, "tokenizer", processor)
    if images is not None and not isinstance(images, list | tuple):
        images = [images]
    images = list(images) if images else None
    if "text" in rec and "conversations" not in rec:
        enc = tok(rec["text"], return_tensors="pt")
        enc = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        ids = enc["input_ids"][0]
        roles = torch.full_like(ids, ANSWER, dtype=torch.int8)
        return _truncate(Sample(sid, enc, roles), max_length, None, 0, 0)

    messages = _messages(rec, sid, len(images or []))
    full = processor.apply_chat_template(messages, tokenize=False)
    prefix = processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    enc = _encode(processor, full, images, sid)
    enc_prefix = _encode(processor, prefix, images, sid)
    ids, ids_prefix = enc["input_ids"][0], enc_prefix["input_ids"][0]
    start = ids_prefix.numel()
    if start > ids.numel() or not torch.equal(ids[:start], ids_prefix):
        raise QigError(
            f"sample {sid}: the prompt rendered with add_generation_prompt is not a token prefix of the full "
            "conversation; the chat template is not supported for answer detection"
        )
    eos = [p for p in range(start, ids.numel()) if ids[p].item() == tok.eos_token_id]
    end = eos[0] + 1 if eos else ids.numel()  # the answer includes its end token
    roles = torch.full_like(ids, PROMPT, dtype=torch.int8)
    roles[start:end] = ANSWER
    n_images = len(images or [])
    if image_token_id is not None:
        roles[ids == image_token_id] = VISION
    sample = Sample(sid, enc, roles)
    return _truncate(sample, max_length, image_token_id, n_images, image_seq_length)


def _messages(rec: dict, sid: str, n_images: int) -> list[dict]:
    turns = rec["conversations"]
    n_placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if n_placeholders == 0 and n_images:
        n_placeholders = n_images  # LLaVA convention: an image without placeholder goes before the first prompt
        turns = [dict(turns[0], value=IMAGE_PLACEHOLDER * n_images + turns[0]["value"])] + list(turns[1:])
    if n_placeholders != n_images:
        raise QigError(
            f"sample {sid}: {n_placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) in the text but {n_images} "
            "image(s); each image needs exactly one placeholder"
        )
    messages = []
    for t in turns:
        content: list[dict] = []
        pieces = t["value"].split(IMAGE_PLACEHOLDER)
        for j, piece in enumerate(pieces):
            if j > 0:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages.append({"role": _ROLE_OF[t["from"]], "content": content})
    return messages


def _encode(processor, text: str, images, sid: str) -> dict[str, torch.Tensor]:
    try:
        enc = processor(text=[text], images=images, return_tensors="pt") if images else processor(text=[text])
    except (ValueError, RuntimeError) as exc:
        raise QigError(f"sample {sid}: the processor refused it: {exc}") from exc
    out = {}
    for k, v in enc.items():
        out[k] = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    return out


def _image_token_id(processor) -> int | None:
    tid = getattr(processor, "image_token_id", None)
    if tid is None:
        token = getattr(processor, "image_token", None)
        tok = getattr(processor, "tokenizer", None)
        if token is not None and tok is not None:
            tid = tok.convert_tokens_to_ids(token)
    return tid


def _truncate(
    sample: Sample, max_length: int, image_token_id: int | None, n_images: int, image_seq_length: int | None
) -> Sample:
    T = sample.roles.numel()
    if T > max_length and image_seq_length is None and (sample.roles[max_length:] == VISION).any():
        raise QigError(
            f"sample {sample.id}: the length cap {max_length} cuts through its image tokens (it has {T} tokens, "
            f"the last image token at position {int((sample.roles == VISION).nonzero().max())}); the model needs "
            "all of an image's tokens: raise the length cap (--max-length) or use smaller images"
        )
    if T > max_length:
        log.warning("sample %s has %d tokens; keeping the first %d (length cap)", sample.id, T, max_length)
        for k, v in list(sample.inputs.items()):
            if v.dim() == 2 and v.shape[1] == T:
                sample.inputs[k] = v[:, :max_length]
        sample.roles = sample.roles[:max_length]
    if image_token_id is not None and n_images:
        n_vision = int((sample.roles == VISION).sum())
        per_image = image_seq_length
        if per_image is not None and n_vision != n_images * per_image:
            raise QigError(
                f"sample {sample.id}: {n_vision} image tokens after rendering (cap {max_length}) but the model "
                f"expects {per_image} per image x {n_images} image(s); raise the length cap or fix the sample"
            )
        if per_image is None and n_vision == 0:
            raise QigError(f"sample {sample.id}: has {n_images} image(s) but no image tokens after rendering")
    if not (sample.roles == ANSWER).any():
        log.warning("sample %s has no answer tokens (truncated?)", sample.id)
    return sample


def _check_n(n_samples: int) -> None:
    if not isinstance(n_samples, int) or n_samples <= 0:
        raise QigError(f"n_samples must be a positive integer, got {n_samples!r}")
