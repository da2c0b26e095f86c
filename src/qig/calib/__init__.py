"""Calibration data: conversations rendered by the model's own processor, with a role per token.

Accepted inputs (METHOD.md section 1); the format is read from the content (a
folder, a parquet file, else JSON / JSONL), not from the file name:

- LLaVA / ShareGPT4V records, as a JSON list or JSONL, plus an image folder::

    {"id": "x", "image": "images/x.png",
     "conversations": [{"from": "human", "value": "<image>\\ndescribe the image."},
                       {"from": "gpt", "value": "two objects: ..."}]}

  ``image`` (or ``images``) may be a list; records without one are text
  conversations. An image without any ``<image>`` placeholder goes before the
  first user text (the LLaVA convention).
- OpenAI-style ``messages`` records, as a JSON list or JSONL::

    {"messages": [{"role": "user", "content": [{"type": "image"},
                                               {"type": "text", "text": "describe the image."}]},
                  {"role": "assistant", "content": "two objects: ..."}],
     "images": ["images/x.png"]}

  ``role``: user / assistant / system; ``content``: a string (``<image>``
  marks an image) or a list of ``{"type": "text", "text": ...}`` and
  ``{"type": "image"}`` items. The images are the record's ``images``, in
  order, or given inline: ``{"type": "image", "image": "images/x.png"}``.
- a Hugging Face ``datasets`` folder (``Dataset.save_to_disk``; a
  ``DatasetDict`` folder with one split) or a parquet file (``to_parquet``,
  or any parquet with these columns), read by ``qig.calib.tables``; its
  columns are found by name: images in ``image`` or ``images`` (datasets'
  Image feature, ``{"bytes", "path"}``, bytes, or paths under the image
  folder; one or a list per row), and ``conversations`` (LLaVA turns),
  ``messages`` (as above) or a caption, ``caption`` or ``text``: the answer
  to the embedded world's "describe the image." prompt. A ``text`` column
  without images is text samples; an ``id`` column names the rows. Needs
  the ``data`` extra: ``pip install 'qig[data]'``.
- plain text JSONL, one ``{"text": "..."}`` per line: the whole text is
  treated as the answer (a language-model calibration sample).

- a Hugging Face hub dataset id (``org/name``; ``split`` picks one of its
  splits when it has several): its parquet (or JSON / JSONL) data files,
  resolved through the hub cache like a model id (``qig.hub``: downloaded
  when online, from the cache when offline) and read as above; e.g.
  ``lmms-lab/flickr30k`` (``image`` + a ``caption`` list: the first caption).
- ``embedded`` (:data:`EMBEDDED`): the embedded world's calibration split,
  asked for by name. It is the default only for the shipped embedded models;
  any other model without calibration data is refused
  (:func:`check_calibration_source`), never silently calibrated on the toy world.

Relative image paths are under ``image_folder``, by default the folder that
holds the calibration file (or ``datasets`` folder). Every format's rows pass
one schema check (``qig.calib.records.check_record``): a bad row gets the same
one-line ``QigError`` naming the record, in any format.

Each token gets a role: ``vision`` (image placeholder positions after
expansion), ``answer`` (every assistant reply, up to and including its end
token), ``prompt`` (other real tokens) and ``pad``. The replies are found
through the chat template itself: the conversation up to a reply, rendered
with ``add_generation_prompt=True``, is a token prefix of the full rendering,
so this works for any family's template (``qig.evaluate`` finds the answers
it scores the same way). A reply ends at its end token (the tokenizer's eos);
for a template that closes no turn with it, an earlier reply ends where the
conversation rendered up to it ends. An assistant message that opens a
conversation answers nothing and stays prompt. Single-turn records are
unchanged by the multi-turn rule: their one reply is the last.

``calibration_for(model, processor, path)`` is the entry point: the model's
family decides which token is the image placeholder the model fills with
image features and how many of them an image has.

    >>> from qig.calib import calibration_for
    >>> from qig.loading import load_model_and_processor
    >>> model, processor = load_model_and_processor()  # doctest: +SKIP
    >>> calib = calibration_for(model, processor, n_samples=4)  # doctest: +SKIP
    >>> calib.roles.shape  # doctest: +SKIP
    torch.Size([4, 80])
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from qig.calib.data import (
    ANSWER,
    DEFAULT_MAX_LENGTH,
    DEFAULT_N_SAMPLES,
    IMAGE_PLACEHOLDER,
    PAD,
    PROMPT,
    ROLE_NAMES,
    VISION,
    CalibBatch,
    CalibrationSet,
    Sample,
)
from qig.calib.files import read_records
from qig.calib.render import answer_span, chat_texts, check_n_samples, from_records
from qig.errors import QigError
from qig.models import family_for

__all__ = [
    "ANSWER",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_N_SAMPLES",
    "IMAGE_PLACEHOLDER",
    "PAD",
    "PROMPT",
    "ROLE_NAMES",
    "VISION",
    "CalibBatch",
    "CalibrationSet",
    "Sample",
    "answer_span",
    "calibration_for",
    "chat_texts",
    "EMBEDDED",
    "check_calibration_file",
    "check_calibration_source",
    "embedded_calibration",
    "from_records",
    "load_calibration",
    "read_records",
    "render_for",
]

log = logging.getLogger(__name__)

EMBEDDED = "embedded"  # --calib embedded: the embedded world's calibration split, asked for by name
FORMATS = (
    "LLaVA/ShareGPT4V JSON or JSONL (with --image-folder), OpenAI messages JSONL, text JSONL, a datasets folder, "
    "a parquet file, a hub dataset id (e.g. lmms-lab/flickr30k)"
)


def check_calibration_source(model: str | os.PathLike | None, calib: str | os.PathLike | None) -> None:
    """Refuse to calibrate a model that is not one of the embedded ones on the embedded world without being asked.

    ``model``: a folder, a hub id or None (the embedded default); ``calib``: what
    ``--calib`` holds (None: not given). Runs before anything is loaded.

    >>> check_calibration_source(None, None)  # the embedded model: its world is the default
    >>> check_calibration_source("Qwen/Qwen2-VL-2B-Instruct", "embedded")  # asked for by name
    >>> check_calibration_source("Qwen/Qwen2-VL-2B-Instruct", None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    qig.errors.QigError: --model Qwen/Qwen2-VL-2B-Instruct is not an embedded model, so it needs ... on purpose
    """
    from qig.embedded import is_embedded_model

    if calib is None and not is_embedded_model(model):
        raise QigError(
            f"--model {model} is not an embedded model, so it needs its calibration data: --calib FILE ({FORMATS}), "
            f"or --calib {EMBEDDED} to calibrate on the embedded toy world on purpose"
        )


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

    check_n_samples(n_samples)
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
    split: str | None = None,
) -> CalibrationSet:
    """Read a calibration file, ``datasets`` folder or hub dataset (formats: the module doc); keep ``n_samples``.

    >>> calib = load_calibration("data/calib/data.json", processor, n_samples=64)  # doctest: +SKIP
    >>> calib = load_calibration("coco-captions.parquet", processor, image_folder="coco/")  # doctest: +SKIP
    >>> calib = load_calibration("lmms-lab/flickr30k", processor, split="test")  # doctest: +SKIP
    """
    pairs = _chosen_pairs(path, image_folder, n_samples, seed, split=split)
    return from_records(
        pairs, processor, max_length=max_length, image_seq_length=image_seq_length, image_token_id=image_token_id
    )


def check_calibration_file(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    n_samples: int = DEFAULT_N_SAMPLES,
    seed: int = 0,
    split: str | None = None,
) -> None:
    """Refuse, before any model is loaded, what ``load_calibration`` would refuse in the file and its images.

    Reads the records (format, schema) and the images of the ``n_samples`` it
    would choose with ``seed``; what needs the processor (placeholders per
    image, the chat template, the length cap) is checked when rendering.

    >>> check_calibration_file("captions.json", image_folder="images/", n_samples=64)  # doctest: +SKIP
    """
    if os.fspath(path) == EMBEDDED:
        if image_folder is not None:
            raise QigError(f"--image-folder goes with a calibration file; --calib {EMBEDDED} has its own images")
        if split is not None:
            raise QigError(f"--calib-split goes with a hub dataset id; --calib {EMBEDDED} is one split")
        return
    _chosen_pairs(path, image_folder, n_samples, seed, quiet=True, split=split)


def _chosen_pairs(
    path, image_folder, n_samples: int, seed: int, quiet: bool = False, split: str | None = None
) -> list[tuple[object, dict]]:
    """(images, record) of the ``n_samples`` records the seed chooses (a shuffle), images read."""
    from qig.calib.hubdata import open_source

    check_n_samples(n_samples)
    source = open_source(path, split)
    path = source.path
    records = source.records
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if len(records) < n_samples and not quiet:
        log.warning("%s holds %d records, fewer than n_samples=%d; using all of them", path, len(records), n_samples)
    chosen = [records[i] for i in order[:n_samples]]  # shuffled order, fixed by the seed
    folder = Path(image_folder) if image_folder is not None else path.parent
    return [(source.images(i, rec, folder), rec) for i, rec in chosen]


def calibration_for(
    model: torch.nn.Module,
    processor,
    path: str | os.PathLike | None = None,
    image_folder: str | os.PathLike | None = None,
    n_samples: int = DEFAULT_N_SAMPLES,
    seed: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    split: str | None = None,
) -> CalibrationSet:
    """Calibration for ``model``: its family (``qig.models``) says which token gets image features and how many.

    path: a LLaVA or ``messages`` JSON/JSONL, a text JSONL, a ``datasets``
    folder, a parquet file or a hub dataset id (``load_calibration``, images
    under ``image_folder``, default the file's folder; ``split`` for a hub
    dataset); ``"embedded"``: the embedded world's calibration split
    (``embedded_calibration``); None: the same, for the embedded models only
    (any other model is refused: :func:`check_calibration_source`).
    seed: shuffles the file's records (default 0), or draws the embedded split
    (default ``world.DEFAULT_CALIB_SEED``).

    >>> from qig.loading import load_model_and_processor
    >>> model, processor = load_model_and_processor()  # doctest: +SKIP
    >>> calib = calibration_for(model, processor, n_samples=32)  # doctest: +SKIP
    >>> calib = calibration_for(model, processor, "captions.json", image_folder="images/")  # doctest: +SKIP
    """
    tokens = _image_tokens(model, processor)
    if path is None:
        check_calibration_source(getattr(model, "name_or_path", "") or "a model built in memory", None)
    if path is None or os.fspath(path) == EMBEDDED:
        if image_folder is not None:
            raise QigError("image_folder goes with a calibration file (path): the embedded split has its own images")
        if split is not None:
            raise QigError("split goes with a hub dataset id (path): the embedded split is one split")
        return embedded_calibration(processor, n_samples, seed=seed, max_length=max_length, **tokens)
    return load_calibration(
        path,
        processor,
        image_folder,
        n_samples,
        seed=0 if seed is None else seed,
        max_length=max_length,
        split=split,
        **tokens,
    )


def render_for(
    model: torch.nn.Module, processor, pairs: Sequence[tuple[object, dict]], max_length: int = DEFAULT_MAX_LENGTH
) -> CalibrationSet:
    """``from_records`` for ``model``: in-memory (images, record) pairs, image tokens as the model's family says.

    >>> calib = render_for(model, processor, world.generate("eval", 8, 0))  # doctest: +SKIP
    """
    return from_records(pairs, processor, max_length=max_length, **_image_tokens(model, processor))


def _image_tokens(model: torch.nn.Module, processor) -> dict[str, int | None]:
    """The id of the token whose positions get image features, and the fixed count per image (None: it varies)."""
    family = family_for(model)
    return {
        "image_token_id": family.vision_token_id(model, processor),
        "image_seq_length": family.image_seq_length(model),
    }
