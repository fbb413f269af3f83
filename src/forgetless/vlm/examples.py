"""Conversations with image parts: the ``Example`` that text and image data both travel as.

Messages follow TRL's convention: a message's content is a string or a list of parts,
``{"type": "image"}`` or ``{"type": "text", "text": ...}``; an example's images are matched to
its image parts in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, Any]]
IGNORE_INDEX = -100  # the label of a token that carries no loss (PyTorch's cross-entropy default)


@dataclass
class Example:
    """One conversation and its images (paths or PIL images, in the order of its image parts);
    a text example has none."""

    messages: Messages
    images: list[Any] = field(default_factory=list)


def image_messages(prompt: str, response: str | None = None, images: int = 1) -> Messages:
    """A user turn with ``images`` image parts before the prompt (+ the assistant's answer)."""
    parts: list[dict[str, str]] = [{"type": "image"} for _ in range(images)]
    messages: Messages = [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]
    if response is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return messages


def as_parts(messages: Messages) -> Messages:
    """Messages with every content as TRL parts (processor templates iterate over parts)."""
    return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]
             if isinstance(m["content"], str) else m["content"]} for m in messages]


def image_count(messages: Messages) -> int:
    return sum(isinstance(m["content"], list) and part.get("type") == "image"
               for m in messages for part in (m["content"] if isinstance(m["content"], list)
                                              else []))
