"""Tiny processors for the tiny LLaVA and Qwen2.5-VL models of ``tiny_models``: a character
tokenizer whose image tokens sit at the ids the tiny configs expect, the real image processors
at 16-32 pixel sizes, and a chat template that renders TRL-style content parts.

Qwen2.5-VL's processor insists on a video processor, which needs torchvision; the PyPI
torchvision wheel does not load against the CPU torch build (``torchvision::nms does not exist``),
so the Qwen processor here is built without one (images only).
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tiny_models import VOCAB, tiny_model

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
_IMAGE_TOKENS = {
    "llava": ["<image>"],
    # ids 124..127 as the tiny Qwen config sets them: vision end, vision start, video, image
    "qwen2_5_vl": ["<|vision_end|>", "<|vision_start|>", "<|video_pad|>", "<|image_pad|>"],
}
_PLACEHOLDER = {"llava": "<image>",
                "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}
_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] {% if m.content is string %}{{ m.content }}"
    "{% else %}{% for p in m.content %}{% if p.type == 'image' %}IMAGE{% else %}{{ p.text }}"
    "{% endif %}{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant] "
    "{% endif %}"
)


def chat_template(arch: str) -> str:
    return _TEMPLATE.replace("IMAGE", _PLACEHOLDER[arch])


def tiny_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """One token per printable character; the arch's image tokens at the top of the vocab."""
    image_tokens = _IMAGE_TOKENS[arch]
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    while len(vocab) < VOCAB - len(image_tokens):
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    for tok in image_tokens:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", extra_special_tokens={},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": image_tokens})
    tokenizer.chat_template = chat_template(arch)
    return tokenizer


def tiny_processor(arch: str):
    """The real processor class of ``arch`` around the tiny tokenizer, at tiny image sizes."""
    tokenizer = tiny_tokenizer(arch)
    if arch == "llava":
        from transformers import LlavaProcessor
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        images = LlavaImageProcessorPil(size={"shortest_edge": 16},
                                        crop_size={"height": 16, "width": 16})
        return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                              vision_feature_select_strategy="full",
                              chat_template=chat_template(arch))
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        class _ImagesOnly(Qwen2_5_VLProcessor):
            def check_argument_for_proper_class(self, name, argument):
                return None if argument is None else super().check_argument_for_proper_class(
                    name, argument)

        images = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=16 * 16, patch_size=4,
                                          merge_size=2, temporal_patch_size=2)
        return _ImagesOnly(image_processor=images, tokenizer=tokenizer,
                           chat_template=chat_template(arch))
    raise ValueError(f"no tiny processor for {arch!r}")


def tiny_vlm_folder(folder: Path, arch: str = "llava", seed: int = 0) -> Path:
    """A saved tiny VLM (weights + processor) that ``load_model`` can read; LLaVA only, since
    loading Qwen2.5-VL's processor from a folder needs torchvision (see the module doc)."""
    tiny_model(arch, seed).save_pretrained(folder)
    tiny_processor(arch).save_pretrained(folder)
    return folder
