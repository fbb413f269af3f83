"""``ImageTextCollator``: batches of image-text examples through the VLM's processor."""

from __future__ import annotations

from typing import Any

from forgetless.errors import ForgetlessError
from forgetless.vlm.examples import IGNORE_INDEX, Example, Messages, image_count
from forgetless.vlm.images import open_image
from forgetless.vlm.processors import image_token_id, process, render_multimodal


class ImageTextCollator:
    """Batches ``Example``s with the VLM's processor; labels are -100 except on assistant turns.

    Each assistant turn's token span is found by processing the conversation up to the turn's
    start and up to its end (with the images those parts hold), so the image tokens the
    processor inserts are counted where they are. A batch longer than ``max_length`` is cut
    at it, unless the cut would fall among image tokens (the model needs all of them).
    """

    def __init__(self, processor: Any, max_length: int = 512) -> None:
        self.processor = processor
        self.max_length = max_length

    def _length(self, messages: Messages, images: list[Any], prompt: bool) -> int:
        text = render_multimodal(self.processor, messages, add_generation_prompt=prompt)
        batch = process(self.processor, [text], [images[: image_count(messages)]])
        return int(batch["input_ids"].shape[1])

    def _spans(self, messages: Messages, images: list[Any]) -> list[tuple[int, int]]:
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._length(messages[:index], images, True) if index else 0
            spans.append((start, self._length(messages[: index + 1], images, False)))
        return spans

    def __call__(self, examples: list[Example]) -> dict:
        import torch

        texts, images, spans = [], [], []
        for example in examples:
            pictures = [open_image(image) for image in example.images]
            texts.append(render_multimodal(self.processor, example.messages))
            images.append(pictures)
            spans.append(self._spans(example.messages, pictures))
        batch = dict(process(self.processor, texts, images))
        ids = batch["input_ids"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, row_spans in enumerate(spans):
            for start, end in row_spans:
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
