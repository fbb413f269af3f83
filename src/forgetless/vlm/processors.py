"""Processor predicates and calls: where a "tokenizer" may be a VLM's processor.

A vision-language model loads with a processor (a tokenizer plus an image processor); text-only
code paths reach its tokenizer through ``text_tokenizer``, image paths go through
``render_multimodal`` and ``process``.
"""

from __future__ import annotations

from typing import Any

from forgetless.vlm.examples import Messages, as_parts


def is_vlm_config(config: Any) -> bool:
    """A vision-language model: its config nests a ``vision_config`` (LLaVA, LLaVA-OneVision,
    Qwen2-VL/2.5-VL, Idefics3/SmolVLM all do)."""
    return getattr(config, "vision_config", None) is not None


def is_processor(obj: Any) -> bool:
    """A multimodal processor (tokenizer + image processor) rather than a bare tokenizer."""
    return hasattr(obj, "image_processor") and hasattr(obj, "tokenizer")


def text_tokenizer(tokenizer_or_processor: Any) -> Any:
    """The text tokenizer inside a processor (or the tokenizer itself): text-only code paths
    (scoring, number-token ids, templates without images) need only this."""
    if is_processor(tokenizer_or_processor):
        return tokenizer_or_processor.tokenizer
    return tokenizer_or_processor


def render_multimodal(processor: Any, messages: Messages,
                      add_generation_prompt: bool = False) -> str:
    """Chat-template text with the processor's image placeholders (expanded when processed)."""
    return processor.apply_chat_template(as_parts(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def process(processor: Any, texts: list[str], images: list[list[Any]],
            padding_side: str = "right") -> dict:
    """One processor call for a batch: images nested per text when every text has some, flat
    (matched to placeholders in order) otherwise, none when no text has any."""
    if all(images):
        pictures: Any = images
    else:
        pictures = [image for group in images for image in group] or None
    return processor(text=texts, images=pictures, padding=True, padding_side=padding_side,
                     add_special_tokens=False, return_tensors="pt")


def image_token_id(processor: Any) -> int | None:
    """The id of the token each image expands into, if the processor has one."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None):
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return token_id
