"""The embedded visual-QA world: small RGB scenes of handwritten digits and shapes.

Every scene is a 48x48 RGB image on a 6x6 grid of 8x8 cells (one cell = one
vision patch of the embedded model). It holds 2-4 objects, each with its own
colour: drawn shapes (circle, square, triangle, cross) and real handwritten
digits from scikit-learn's bundled ``load_digits`` set, on a dark background
with light noise. Digit samples are split by index: the first 1,437 feed the
train and calib splits, the last 360 feed only the eval split, so evaluation
shows digits the model never saw.

Splits are written as PNG files plus a LLaVA/ShareGPT4V style JSON list, the
format users hand us for real calibration data::

    >>> from qig.embedded.world import write_split
    >>> write_split("eval", "/tmp/world-eval", n=16, seed=1234)  # doctest: +SKIP

Everything is a pure function of the seed: same seed, same bytes.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from qig.fileio import atomic_dir

GRID = 6  # cells per side
CELL = 8  # pixels per cell (= the embedded model's patch size)
IMAGE_SIZE = GRID * CELL  # 48

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 100, 240),
    "yellow": (230, 215, 40),
    "purple": (170, 60, 210),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "cross")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
QUESTION_TYPES = ("colour", "shape", "count", "digit", "position", "relation", "exists", "sum")
N_DIGITS_TRAIN = 1437  # digit samples [0, 1437) for train/calib, [1437, 1797) for eval
SPLIT_IDS = {"train": 0, "calib": 1, "eval": 2}
DEFAULT_EVAL_SEED = 1234
DEFAULT_CALIB_SEED = 0
CAPTION_PROMPT = "describe the image."


def _shape_masks() -> dict[str, np.ndarray]:
    """8x8 float masks in [0, 1] for the drawn shapes (1 px margin)."""
    yy, xx = np.mgrid[0:CELL, 0:CELL].astype(np.float32) + 0.5
    c = CELL / 2
    circle = (((yy - c) ** 2 + (xx - c) ** 2) <= 3.2**2).astype(np.float32)
    square = np.zeros((CELL, CELL), np.float32)
    square[1:7, 1:7] = 1.0
    triangle = np.zeros((CELL, CELL), np.float32)
    for r in range(1, 7):  # apex at the top, base at the bottom
        half = (r - 1) * 0.55 + 0.5
        triangle[r, int(np.floor(c - half)) : int(np.ceil(c + half))] = 1.0
    cross = np.zeros((CELL, CELL), np.float32)
    cross[3:5, 1:7] = 1.0
    cross[1:7, 3:5] = 1.0
    return {"circle": circle, "square": square, "triangle": triangle, "cross": cross}


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


@dataclass(frozen=True)
class Obj:
    """One object of a scene: a shape or a digit, its colour and grid cell."""

    kind: str  # "shape" | "digit"
    name: str  # shape name, or the digit as a string
    colour: str
    row: int  # grid cell, 0..GRID-1
    col: int
    digit_index: int = -1  # index into load_digits for digits

    @property
    def region(self) -> str:
        r, c = ROWS[self.row * 3 // GRID], COLS[self.col * 3 // GRID]
        if r == "middle" and c == "center":
            return "center"
        return f"{r} {c}"

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.name}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]


def _digit_pool(split: str) -> np.ndarray:
    n_all = len(_digits()[1])
    return np.arange(N_DIGITS_TRAIN, n_all) if split == "eval" else np.arange(0, N_DIGITS_TRAIN)


def sample_scene(rng: np.random.Generator, split: str, n_digits: int | None = None) -> Scene:
    """Draw a scene: 2-4 objects with distinct colours, cells, shape types and digit values."""
    n_obj = int(rng.integers(2, 5))
    if n_digits is None:
        n_digits = int(rng.integers(0, min(2, n_obj) + 1))
    n_digits = min(n_digits, n_obj)
    n_shapes = n_obj - n_digits
    colours = rng.choice(list(COLOURS), size=n_obj, replace=False)
    cells = rng.choice(GRID * GRID, size=n_obj, replace=False)
    shapes = rng.choice(SHAPES, size=n_shapes, replace=False)
    pool = _digit_pool(split)
    targets = _digits()[1]
    objs, used_values = [], set()
    for i in range(n_obj):
        row, col = divmod(int(cells[i]), GRID)
        if i < n_shapes:
            objs.append(Obj("shape", str(shapes[i]), str(colours[i]), row, col))
            continue
        while True:
            idx = int(pool[rng.integers(len(pool))])
            if int(targets[idx]) not in used_values:
                break
        used_values.add(int(targets[idx]))
        objs.append(Obj("digit", str(int(targets[idx])), str(colours[i]), row, col, idx))
    order = rng.permutation(n_obj)
    return Scene(tuple(objs[i] for i in order))


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Render a scene to a 48x48 RGB image with light background noise."""
    masks = _shape_masks()
    images = _digits()[0]
    canvas = rng.normal(18.0, 6.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    for o in scene.objects:
        mask = masks[o.name] if o.kind == "shape" else images[o.digit_index]
        gain = float(rng.uniform(0.85, 1.0))
        colour = np.asarray(COLOURS[o.colour], np.float32) * gain
        r0, c0 = o.row * CELL, o.col * CELL
        cell = canvas[r0 : r0 + CELL, c0 : c0 + CELL]
        canvas[r0 : r0 + CELL, c0 : c0 + CELL] = cell * (1 - mask[..., None]) + mask[..., None] * colour
    return Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8), "RGB")


def blank_image(seed: int) -> Image.Image:
    """An image with no object: the background and its noise only."""
    return render(Scene(()), np.random.default_rng(np.random.SeedSequence([seed, 7])))


def _number_word(n: int) -> str:
    return str(n)


def caption(scene: Scene) -> str:
    """A caption describing the whole scene, objects in reading order."""
    objs = sorted(scene.objects, key=lambda o: (o.row, o.col))
    parts = [f"a {o.phrase} at {'the center' if o.region == 'center' else o.region}" for o in objs]
    body = ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else parts[0]
    return f"{_number_word(len(objs))} objects: {body}."


def ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """One (question, answer) of the given type, or None if the scene cannot support it."""
    objs = list(scene.objects)
    shapes = [o for o in objs if o.kind == "shape"]
    digits = [o for o in objs if o.kind == "digit"]
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    if qtype == "colour":
        o = pick(objs)
        ref = f"the {o.name}" if o.kind == "shape" else f"the digit {o.name}"
        return f"what colour is {ref}?", o.colour
    if qtype == "shape":
        if not shapes:
            return None
        o = pick(shapes)
        return f"what shape is {o.colour}?", o.name
    if qtype == "count":
        what = pick(["objects", "shapes", "digits"])
        n = {"objects": len(objs), "shapes": len(shapes), "digits": len(digits)}[what]
        return f"how many {what} are there?", str(n)
    if qtype == "digit":
        if not digits:
            return None
        o = pick(digits)
        return f"which digit is {o.colour}?", o.name
    if qtype == "position":
        o = pick(objs)
        return f"where is the {o.phrase}?", o.region
    if qtype == "relation":
        a, b = (objs[i] for i in rng.choice(len(objs), size=2, replace=False))
        if rng.random() < 0.5:
            if a.col == b.col:
                return None
            return f"is the {a.phrase} left of the {b.phrase}?", "yes" if a.col < b.col else "no"
        if a.row == b.row:
            return None
        return f"is the {a.phrase} above the {b.phrase}?", "yes" if a.row < b.row else "no"
    if qtype == "exists":
        if rng.random() < 0.5:
            o = pick(objs)
            return f"is there a {o.phrase}?", "yes"
        present = {o.phrase for o in objs}
        names = list(SHAPES) + [str(d) for d in range(10)]
        for _ in range(50):
            phrase = f"{pick(list(COLOURS))} {pick(names)}"
            if phrase not in present:
                return f"is there a {phrase}?", "no"
        return None
    if qtype == "sum":
        if len(digits) != 2:
            return None
        return "what is the sum of the two digits?", str(int(digits[0].name) + int(digits[1].name))
    raise ValueError(f"unknown question type {qtype!r}; allowed: {', '.join(QUESTION_TYPES)}")


def sample_qa(rng: np.random.Generator, split: str, qtype: str | None = None) -> tuple[Scene, str, str, str]:
    """Draw a scene and one question about it, balanced over question types."""
    if qtype is None:
        qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    while True:
        scene = sample_scene(rng, split, n_digits=2 if qtype == "sum" else None)
        qa = ask(scene, qtype, rng)
        if qa is not None:
            return scene, qa[0], qa[1], qtype


def _split_rng(split: str, seed: int) -> np.random.Generator:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLIT_IDS)}")
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split]]))


def generate(split: str, n: int, seed: int) -> list[tuple[Image.Image, dict]]:
    """Generate ``n`` records of a split in memory: (image, LLaVA-style record).

    ``train`` and ``eval`` hold one question per image; ``calib`` holds captions.

    >>> recs = generate("eval", 2, seed=1234)
    >>> recs[0][1]["conversations"][0]["value"].startswith("<image>\\n")
    True
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = _split_rng(split, seed)
    out = []
    for i in range(n):
        if split == "calib":
            scene = sample_scene(rng, split)
            q, a, qtype = CAPTION_PROMPT, caption(scene), "caption"
        else:
            scene, q, a, qtype = sample_qa(rng, split)
        image = render(scene, rng)
        rec = {
            "id": f"{split}-{seed}-{i:06d}",
            "image": f"images/{split}-{i:06d}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{q}"},
                {"from": "gpt", "value": a},
            ],
            "type": qtype,
        }
        out.append((image, rec))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_split(split: str, out_dir: str | os.PathLike, n: int, seed: int, overwrite: bool = False) -> Path:
    """Write a split as ``out_dir/images/*.png`` + ``out_dir/data.json``; returns the JSON path.

    Written to a temporary folder first and renamed into place, so a failure
    leaves nothing half-written; an existing folder is refused unless ``overwrite``.
    """
    out = Path(out_dir)
    records = generate(split, n, seed)
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "images").mkdir()
        for image, rec in records:
            (tmp / rec["image"]).write_bytes(png_bytes(image))
        data = [rec for _, rec in records]
        (tmp / "data.json").write_text(json.dumps(data, indent=1) + "\n")
    return out / "data.json"


def vocabulary() -> list[str]:
    """Every word the world can produce (the embedded tokenizer's vocabulary)."""
    words = set(COLOURS) | set(SHAPES) | set(ROWS) | set(COLS) | {str(i) for i in range(19)}
    words |= set(
        "what colour is the digit shape how many objects shapes digits are there which where "
        "left of above a at and sum two yes no describe image".split()
    )
    words |= {"?", ".", ",", ":"}
    return sorted(words)
