"""``ImageTextCollator`` runs the processor once per batch, not 2 times per assistant turn per
example, and its labels are exactly those of processing each turn's prefix (the way it measured
spans before): on the tiny LLaVA and Qwen2.5-VL processors with single-, multi-image, text-only
and multi-turn rows, and on ``count_shapes`` rows through the embedded VLM's own processor."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from forgetless.vlm.collator import ImageTextCollator, ProcessedSpansCollator
from forgetless.vlm.examples import Example, image_messages
from forgetless.vlm.tasks import image_task_rows
from tiny_vlm import tiny_processor


class Counting:
    """A processor that counts its calls (everything else passes through)."""

    def __init__(self, processor: Any) -> None:
        self.inner, self.calls = processor, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _turn(role: str, text: str, images: int = 0) -> dict:
    return {"role": role, "content": [{"type": "image"}] * images + [{"type": "text",
                                                                      "text": text}]}


def _examples() -> list[Example]:
    red, blue = Image.new("RGB", (20, 20), "red"), Image.new("RGB", (24, 16), "blue")
    return [
        Example(image_messages("Color?", "red"), [red]),
        Example(image_messages("Colors?", "blue, red", images=2), [blue, red]),
        Example([{"role": "user", "content": "No image here"},
                 {"role": "assistant", "content": "ok"}]),
        Example([_turn("system", "Be brief."), _turn("user", "What is it?", 1),
                 _turn("assistant", "a square"), _turn("user", "And its color?"),
                 _turn("assistant", "red")], [red]),
        # an image after the first answer: the spans after it need the slow path
        Example([_turn("user", "This?", 1), _turn("assistant", "red"),
                 _turn("user", "And this?", 1), _turn("assistant", "blue")], [red, blue]),
    ]


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_labels_match_processing_each_prefix_with_fewer_processor_calls(arch):
    examples = _examples()
    new, old = Counting(tiny_processor(arch)), Counting(tiny_processor(arch))
    batch = ImageTextCollator(new, max_length=512)(examples)
    _same(batch, ProcessedSpansCollator(old, max_length=512)(examples))
    assert (batch["labels"] != -100).sum() > 0
    # before: 1 batch call + 2 per assistant turn = 1 + 2+2+2+4+4 = 15; now: 1 + the last
    # example's 4 (its second image comes after an answer)
    assert old.calls == 15
    assert new.calls == 1 + 4
    new.calls = 0
    ImageTextCollator(new)(examples[:4])
    assert new.calls == 1  # once per batch when every image precedes the answers


def test_a_failed_check_falls_back_to_processing(monkeypatch):
    """Should the text tokenizer split a span differently from the processed row, the collator
    measures that example the slow way rather than mislabel it."""
    processor = Counting(tiny_processor("llava"))
    collator = ImageTextCollator(processor)
    example = _examples()[0]
    real = ImageTextCollator._spans
    monkeypatch.setattr(ImageTextCollator, "_spans", lambda self, m, i, text, ids: real(
        self, m, i, text, [*ids[:-2], -1, -1]))  # the row's answer tokens no longer match
    batch = collator([example])
    assert processor.calls == 1 + 2
    _same(batch, ProcessedSpansCollator(tiny_processor("llava"))([example]))


@pytest.mark.integration
def test_count_shapes_labels_match_through_the_embedded_vlm_processor():
    from transformers import AutoTokenizer

    from forgetless.models import resolve_model
    from forgetless.vlm.build import BuildSpec, make_processor

    spec = BuildSpec()
    processor = make_processor(AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")),
                               spec)
    rows = image_task_rows("count_shapes", "train", n=16, seed=3)
    examples = [Example(image_messages(row.prompt, row.response), [row.image]) for row in rows]
    new, old = Counting(processor), Counting(processor)
    for start in range(0, 16, 8):
        _same(ImageTextCollator(new)(examples[start:start + 8]),
              ProcessedSpansCollator(old)(examples[start:start + 8]))
    assert (new.calls, old.calls) == (2, 2 + 2 * 16)  # per batch; 2 per example more before
