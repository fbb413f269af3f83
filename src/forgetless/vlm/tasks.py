"""Built-in image tasks drawn with Pillow: no download, seeded, train and test disjoint.

Each task draws small images (``size`` pixels square, 64 by default) with a question whose
answer is short and checkable, so a tiny VLM fine-tune has a skill to learn and a target to
measure, as ``count_letters`` does for text models:

* ``count_shapes``: "How many circles are in the image?" -> ``"3"`` (1-5 circles among squares
  and triangles);
* ``read_clock``: an analog clock -> ``"HH:MM"`` (hours 01-12, minutes in steps of 5);
* ``name_color``: one shape filled with one of eight colours -> ``"red"``;
* ``name_shape``: one shape -> ``"circle"`` / ``"square"`` / ``"triangle"`` / ``"diamond"``;
* ``spatial_relation``: a red and a blue shape in different columns -> ``"left"`` / ``"right"``
  (is the red one left or right of the blue one);
* ``read_digit``: a real handwritten digit -> ``"0"``-``"9"``: the 1,797 8x8 scans of
  scikit-learn's ``load_digits``, upscaled with Pillow. scikit-learn is no new dependency (MLflow,
  a core dependency, already installs it) and ships the scans inside its wheel, so real
  handwriting costs no download.

Every example comes from a parameter tuple (positions, colours, time); an example is a test
example exactly when the SHA-256 of its parameters falls in one fifth of the hash space, so no
picture is in both splits, whatever the seed or count. Rows also carry answer ``choices`` and
the ``gold`` index, so the same task serves as a multiple-choice held-out task.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forgetless.errors import ForgetlessError

COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (235, 210, 20), "purple": (140, 40, 170), "orange": (245, 130, 20),
    "black": (20, 20, 20), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DEFAULT_SIZE = 64
TEST_SHARE = 5  # one example in five is a test example


@dataclass(frozen=True)
class ImageRow:
    """One example: the picture, the question, the answer and the answer choices."""

    image: Any  # PIL.Image.Image
    prompt: str
    response: str
    choices: tuple[str, ...]
    gold: int
    key: str  # the parameters the picture was drawn from (its identity)


def is_test(key: str) -> bool:
    """The split of an example, a function of its parameters only."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % TEST_SHARE == 0


def _shape(draw: Any, shape: str, box: tuple[float, float, float, float], fill: Any) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def _canvas(size: int) -> tuple[Any, Any]:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    return image, ImageDraw.Draw(image)


def _cell_box(cell: int, size: int, grid: int = 3) -> tuple[float, float, float, float]:
    step = size / grid
    row, col = divmod(cell, grid)
    pad = step * 0.15
    return (col * step + pad, row * step + pad, (col + 1) * step - pad, (row + 1) * step - pad)


def _count_shapes(rng: random.Random, size: int) -> ImageRow:
    circles = rng.randint(1, 5)
    others = rng.randint(0, 9 - circles)
    cells = rng.sample(range(9), circles + others)
    kinds = ["circle"] * circles + [rng.choice(("square", "triangle")) for _ in range(others)]
    colors = [rng.choice(list(COLORS)) for _ in cells]
    image, draw = _canvas(size)
    for cell, kind, color in zip(cells, kinds, colors):
        _shape(draw, kind, _cell_box(cell, size), COLORS[color])
    choices = tuple(str(n) for n in range(1, 6))
    key = f"count_shapes:{size}:{cells}:{kinds}:{colors}"
    return ImageRow(image, "How many circles are in the image? Answer with a number only.",
                    str(circles), choices, circles - 1, key)


def clock_time(hour: int, minute: int) -> str:
    """The answer format of ``read_clock``: zero-padded ``HH:MM`` with hours 01-12."""
    return f"{hour:02d}:{minute:02d}"


def _read_clock(rng: random.Random, size: int) -> ImageRow:
    hour, minute = rng.randint(1, 12), 5 * rng.randint(0, 11)
    image, draw = _canvas(size)
    c, r = size / 2, size * 0.45
    draw.ellipse((c - r, c - r, c + r, c + r), outline=(0, 0, 0), width=max(1, size // 32))
    for tick in range(12):
        angle = math.radians(tick * 30)
        inner = r * 0.85
        draw.line((c + inner * math.sin(angle), c - inner * math.cos(angle),
                   c + r * math.sin(angle), c - r * math.cos(angle)), fill=(0, 0, 0))
    hands = ((((hour % 12) + minute / 60) * 30, r * 0.5, max(2, size // 16)),
             (minute * 6, r * 0.85, max(1, size // 32)))
    for degrees, length, width in hands:
        angle = math.radians(degrees)
        draw.line((c, c, c + length * math.sin(angle), c - length * math.cos(angle)),
                  fill=(0, 0, 0), width=width)
    answer = clock_time(hour, minute)
    # Three distractors: the hands swapped, an hour off, and five minutes off.
    swapped = clock_time(max(1, minute // 5) if minute else 12, (hour % 12) * 5)
    distractors = [swapped, clock_time(hour % 12 + 1, minute), clock_time(hour, (minute + 5) % 60)]
    choices = [answer] + [d for d in dict.fromkeys(distractors) if d != answer]
    while len(choices) < 4:
        choices.append(clock_time((hour + len(choices)) % 12 + 1, minute))
    order = sorted(choices[:4])
    key = f"read_clock:{size}:{hour}:{minute}"
    return ImageRow(image, "What time does the clock show? Answer as HH:MM.", answer,
                    tuple(order), order.index(answer), key)


def _one_shape(rng: random.Random, size: int) -> tuple[Any, str, str, tuple[float, ...]]:
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    side = rng.uniform(0.35, 0.7) * size
    x0, y0 = rng.uniform(0, size - side), rng.uniform(0, size - side)
    box = (round(x0), round(y0), round(x0 + side), round(y0 + side))
    image, draw = _canvas(size)
    _shape(draw, shape, box, COLORS[color])
    return image, shape, color, box


def _name_color(rng: random.Random, size: int) -> ImageRow:
    image, shape, color, box = _one_shape(rng, size)
    choices = tuple(COLORS)
    return ImageRow(image, "What color is the shape? Answer with one word.", color, choices,
                    choices.index(color), f"name_color:{size}:{shape}:{color}:{box}")


def _name_shape(rng: random.Random, size: int) -> ImageRow:
    image, shape, color, box = _one_shape(rng, size)
    return ImageRow(image, "What shape is in the image? Answer with one word.", shape, SHAPES,
                    SHAPES.index(shape), f"name_shape:{size}:{shape}:{color}:{box}")


def _spatial_relation(rng: random.Random, size: int) -> ImageRow:
    columns = sorted(rng.sample(range(4), 2))
    red_left = rng.random() < 0.5
    rows = [rng.randrange(4), rng.randrange(4)]
    shapes = [rng.choice(SHAPES), rng.choice(SHAPES)]
    image, draw = _canvas(size)
    step = size / 4
    colors = ("red", "blue") if red_left else ("blue", "red")
    for column, row, shape, color in zip(columns, rows, shapes, colors):
        pad = step * 0.1
        box = (column * step + pad, row * step + pad, (column + 1) * step - pad,
               (row + 1) * step - pad)
        _shape(draw, shape, box, COLORS[color])
    answer = "left" if red_left else "right"
    key = f"spatial_relation:{size}:{columns}:{rows}:{shapes}:{colors}"
    return ImageRow(image, "Is the red shape left or right of the blue shape? Answer with one "
                    "word.", answer, ("left", "right"), ("left", "right").index(answer), key)


@functools.cache
def _digits() -> tuple[Any, Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def _read_digit(rng: random.Random, size: int) -> ImageRow:
    from PIL import Image

    images, labels = _digits()
    index = rng.randrange(len(labels))
    ink = (255 - images[index] * (255 / 16)).clip(0, 255).astype("uint8")  # dark on white
    image = Image.fromarray(ink, mode="L").resize((size, size), Image.Resampling.BILINEAR)
    answer = str(int(labels[index]))
    choices = tuple(str(n) for n in range(10))
    return ImageRow(image.convert("RGB"), "What digit is written in the image? Answer with a "
                    "number only.", answer, choices, int(answer), f"read_digit:{size}:{index}")


IMAGE_TASKS: dict[str, Callable[[random.Random, int], ImageRow]] = {
    "count_shapes": _count_shapes,
    "read_clock": _read_clock,
    "name_color": _name_color,
    "name_shape": _name_shape,
    "spatial_relation": _spatial_relation,
    "read_digit": _read_digit,
}


def image_task_rows(name: str, split: str = "train", n: int = 1000, seed: int = 0,
                    size: int = DEFAULT_SIZE) -> list[ImageRow]:
    """``n`` examples of task ``name`` from ``split`` (train or test), the same for the same
    arguments. Draws are rejected until they land in the split, so the splits never share a
    picture; the test split of a small task (``read_clock`` has 144 times) repeats examples
    rather than borrowing from train."""
    if name not in IMAGE_TASKS:
        raise ForgetlessError(f"unknown image task '{name}' (built-in: {', '.join(IMAGE_TASKS)})")
    if split not in ("train", "test"):
        raise ForgetlessError(f"image task '{name}': split must be train or test, not '{split}'")
    if size < 16:
        raise ForgetlessError(f"image task '{name}': size must be at least 16 pixels")
    draw = IMAGE_TASKS[name]
    rng = random.Random(f"{name}:{split}:{seed}:{size}")
    rows: list[ImageRow] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ForgetlessError(f"image task '{name}': cannot draw {n} {split} examples")
        row = draw(rng, size)
        if is_test(row.key) == (split == "test"):
            rows.append(row)
    return rows
