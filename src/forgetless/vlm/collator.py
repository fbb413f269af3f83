"""``ImageTextCollator``: batches of image-text examples through the VLM's processor."""

from __future__ import annotations

from typing import Any

from forgetless.errors import ForgetlessError
from forgetless.vlm.examples import IGNORE_INDEX, Example, Messages, image_count
from forgetless.vlm.images import open_image
from forgetless.vlm.processors import (
    image_token_id,
    process,
    render_multimodal,
    text_tokenizer,
)


class ImageTextCollator:
    """Batches ``Example``s with the VLM's processor; labels are -100 except on assistant turns.

    The processor (which decodes and resizes every image) runs once per batch. Each assistant
    turn's token span is the text tokenizer's length of the conversation up to the turn's start
    and up to its end, shifted by the image tokens the processor inserted: when every image
    comes before the turn, that shift is the processed row's length minus the tokenizer's length
    of the whole text. The span's tokens are checked against the processed row; a conversation
    with an image at or after an assistant turn, or whose check fails, is measured the slow way
    (``spans_by_processing``: processing each turn's prefix with its images), which gives the
    same spans. A batch longer than ``max_length`` is cut at it, unless the cut would fall among
    image tokens (the model needs all of them).
    """

    def __init__(self, processor: Any, max_length: int = 512) -> None:
        self.processor = processor
        self.max_length = max_length

    def _length(self, messages: Messages, images: list[Any], prompt: bool) -> int:
        text = render_multimodal(self.processor, messages, add_generation_prompt=prompt)
        batch = process(self.processor, [text], [images[: image_count(messages)]])
        return int(batch["input_ids"].shape[1])

    def spans_by_processing(self, messages: Messages, images: list[Any]) -> list[tuple[int, int]]:
        """Assistant spans from processor calls on each turn's prefix (2 per turn)."""
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._length(messages[:index], images, True) if index else 0
            spans.append((start, self._length(messages[: index + 1], images, False)))
        return spans

    def _spans(self, messages: Messages, images: list[Any], text: str,
               ids: list[int]) -> list[tuple[int, int]]:
        """Assistant spans of one processed row ``ids`` (without padding) of ``text``, from one
        text-tokenizer call; the processor only when the shortcut does not hold."""
        turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if any(image_count(messages[i:]) for i in turns):  # image tokens inside or after a turn
            return self.spans_by_processing(messages, images)
        texts = [text]
        for i in turns:
            texts.append(render_multimodal(self.processor, messages[:i], True) if i else "")
            texts.append(render_multimodal(self.processor, messages[: i + 1]))
        tokens = text_tokenizer(self.processor)(texts, add_special_tokens=False)["input_ids"]
        shift = len(ids) - len(tokens[0])  # the image tokens the processor inserted
        spans = []
        for k, i in enumerate(turns):
            prefix, upto = tokens[1 + 2 * k], tokens[2 + 2 * k]
            start, end = (len(prefix) + shift if i else 0), len(upto) + shift
            if ids[start:end] != upto[len(prefix):]:  # tokenization not prefix-stable here
                return self.spans_by_processing(messages, images)
            spans.append((start, end))
        return spans

    def __call__(self, examples: list[Example]) -> dict:
        import torch

        texts, images = [], []
        for example in examples:
            images.append([open_image(image) for image in example.images])
            texts.append(render_multimodal(self.processor, example.messages))
        batch = dict(process(self.processor, texts, images))
        ids = batch["input_ids"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        lengths = batch["attention_mask"].sum(dim=1).tolist()  # padded on the right
        for row, example in enumerate(examples):
            row_ids = ids[row, : lengths[row]].tolist()
            for start, end in self._spans(example.messages, images[row], texts[row], row_ids):
                labels[row, start:end] = ids[row, start:end]
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
        width = ids.shape[1]
        if width > self.max_length:
            token = image_token_id(self.processor)
            if token is not None and (ids[:, self.max_length:] == token).any():
                raise ForgetlessError(
                    f"an example with images is {width} tokens long and max_length "
                    f"{self.max_length} would cut its image tokens: raise max_length")
            for key, value in batch.items():
                if torch.is_tensor(value) and value.ndim == 2 and value.shape[1] == width:
                    batch[key] = value[:, : self.max_length]
        return batch


class ProcessedSpansCollator(ImageTextCollator):
    """Every assistant span measured the slow way (``spans_by_processing``, 2 processor calls
    per turn): the reference that ``ImageTextCollator``'s shortcut is tested and benchmarked
    against."""

    def _spans(self, messages: Messages, images: list[Any], text: str,
               ids: list[int]) -> list[tuple[int, int]]:  # fmt: skip
        return self.spans_by_processing(messages, images)
