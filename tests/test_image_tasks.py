"""Built-in image tasks: seeded and reproducible, train and test disjoint, answers right."""

from __future__ import annotations

import pytest

from forgetless.errors import ForgetlessError
from forgetless.vlm.tasks import COLORS, IMAGE_TASKS, SHAPES, image_task_rows, is_test

PIXELS = ((255, 255, 255),)


@pytest.mark.parametrize("name", sorted(IMAGE_TASKS))
def test_seeded_reproducible_and_disjoint(name):
    train = image_task_rows(name, "train", n=40, seed=1, size=32)
    again = image_task_rows(name, "train", n=40, seed=1, size=32)
    test = image_task_rows(name, "test", n=20, seed=1, size=32)
    assert [r.key for r in train] == [r.key for r in again]
    assert [r.image.tobytes() for r in train] == [r.image.tobytes() for r in again]
    assert {r.key for r in train}.isdisjoint(r.key for r in test)
    assert {r.image.tobytes() for r in train}.isdisjoint(r.image.tobytes() for r in test)
    assert all(not is_test(r.key) for r in train) and all(is_test(r.key) for r in test)
    assert image_task_rows(name, "train", n=5, seed=2, size=32)[0].key != train[0].key or \
        name == "read_clock"
    for row in train + test:
        assert row.image.size == (32, 32) and row.image.mode == "RGB"
        assert row.choices[row.gold] == row.response
        assert len(set(row.choices)) == len(row.choices)


def _colors(image) -> set[tuple[int, int, int]]:
    return {color for _, color in image.getcolors(maxcolors=4096)}


def test_count_shapes_counts_circles():
    for row in image_task_rows("count_shapes", "train", n=30, size=64):
        circles = row.key.split(":")[3].count("circle")
        assert row.response == str(circles) and 1 <= circles <= 5


def test_name_color_and_name_shape_answers_match_the_picture():
    for row in image_task_rows("name_color", "test", n=20, size=32):
        assert COLORS[row.response] in _colors(row.image)
        assert row.response in row.choices
    for row in image_task_rows("name_shape", "test", n=20, size=32):
        assert row.response in SHAPES and f":{row.response}:" in row.key


def test_spatial_relation_answer_matches_where_red_is():
    for row in image_task_rows("spatial_relation", "train", n=20, size=64):
        pixels = row.image.load()
        red = [x for x in range(64) for y in range(64) if pixels[x, y] == COLORS["red"]]
        blue = [x for x in range(64) for y in range(64) if pixels[x, y] == COLORS["blue"]]
        assert red and blue
        assert max(red) < min(blue) if row.response == "left" else min(red) > max(blue)


def test_read_digit_is_a_real_scan_upscaled():
    from sklearn.datasets import load_digits

    digits = load_digits()
    for row in image_task_rows("read_digit", "test", n=10, size=32):
        index = int(row.key.rsplit(":", 1)[1])
        assert row.response == str(digits.target[index]) and row.choices[row.gold] == row.response
        small = row.image.convert("L").resize((8, 8))
        dark = [v < 128 for v in small.getdata()]
        assert sum(dark) > 4  # ink, drawn dark on white
    test_keys = {r.key for r in image_task_rows("read_digit", "test", n=200)}
    assert len(test_keys) > 100  # enough distinct scans in the test fifth (1,797 in all)


def test_read_clock_answer_format_and_hands():
    rows = image_task_rows("read_clock", "train", n=30, size=64)
    for row in rows:
        hour, minute = (int(x) for x in row.response.split(":"))
        assert len(row.response) == 5 and 1 <= hour <= 12 and minute % 5 == 0
        assert row.key.endswith(f":{hour}:{minute}")
    twelve = next(r for r in image_task_rows("read_clock", "train", n=400) if
                  r.response == "12:00")
    pixels = twelve.image.load()  # both hands point straight up: dark above the centre
    assert pixels[32, 12] == (0, 0, 0) and pixels[32, 52] == (255, 255, 255)


def test_bad_arguments_are_one_line():
    with pytest.raises(ForgetlessError, match="unknown image task"):
        image_task_rows("count_dogs")
    with pytest.raises(ForgetlessError, match="split"):
        image_task_rows("name_color", "validation")
    with pytest.raises(ForgetlessError, match="at least 16"):
        image_task_rows("name_color", size=8)


def test_builtin_image_task_is_training_data():
    from forgetless.data import load_examples

    examples = load_examples("name_shape", "test")
    assert len(examples) == 2000 and all(len(e.images) == 1 for e in examples[:5])
    assert examples[0].messages[0]["content"][0] == {"type": "image"}


def test_every_image_task_is_a_target_and_a_continual_stage(tmp_path):
    from forgetless.continual import ContinualConfig, resolve_stages
    from forgetless.eval import registered_targets

    assert set(IMAGE_TASKS) <= set(registered_targets())
    config = ContinualConfig(tasks=["count_shapes", "read_clock", "read_digit"])
    assert [s.target for s in resolve_stages(config, tmp_path)] == [
        "count_shapes", "read_clock", "read_digit"]
