"""Layer selection: ``freeze-bottom:N`` and ``layers:a-b``, combinable with every base method.

"Spurious forgetting" (Zheng et al., ICLR 2025, arXiv 2501.13453) traces much of what looks
like forgetting to the bottom layers re-aligning to the new task's format, and freezing them
keeps general ability (task-0 accuracy 11 → 44 % in their continual setting). So a layer
selection narrows what the base method trains to a range of decoder layers:

* ``freeze-bottom:N`` freezes the input embeddings (below layer 0) and decoder layers
  ``0 .. N-1``; the rest of what the base trains still trains (with ``full``: layers ``N..``,
  the final norm and an untied LM head; a head tied to the embeddings is the same tensor and
  stays frozen with them).
* ``layers:a-b`` (0-based, both ends included; ``layers:a`` is one layer) trains only the base's
  parameters inside decoder layers ``a .. b``: nothing outside the layer list (embeddings, final
  norm, head) trains.

Both find the layers structurally (``layout.text_layout``), so they work on a VLM's language
model exactly as on a text model. With ``lora`` they limit which layers get adapters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from forgetless.errors import ForgetlessError
from forgetless.methods.layout import text_decoder, text_layout

FREEZE_BOTTOM = "freeze-bottom"
LAYERS = "layers"
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class LayerSelection:
    """A parsed ``freeze-bottom:N`` (``bottom=N``) or ``layers:a-b`` (``first=a, last=b``)."""

    bottom: int | None = None
    first: int | None = None
    last: int | None = None

    @property
    def name(self) -> str:
        if self.bottom is not None:
            return f"{FREEZE_BOTTOM}:{self.bottom}"
        return f"{LAYERS}:{self.first}" + (f"-{self.last}" if self.last != self.first else "")

    def check(self, num_layers: int, where: str = "") -> None:
        """The selection must leave some layer training and name only existing layers."""
        prefix = f"{where}: " if where else ""
        if self.bottom is not None and self.bottom >= num_layers:
            raise ForgetlessError(
                f"{prefix}{self.name} freezes {self.bottom} layers but the model has "
                f"{num_layers} decoder layers (N must be at most {num_layers - 1})")
        if self.last is not None and self.last >= num_layers:
            raise ForgetlessError(
                f"{prefix}{self.name} names layer {self.last} but the model has {num_layers} "
                f"decoder layers (0 .. {num_layers - 1})")

    def trains_layer(self, index: int) -> bool:
        if self.bottom is not None:
            return index >= self.bottom
        return self.first <= index <= self.last


def is_layer_part(part: str) -> bool:
    """Whether one ``+``-separated part of a method name is a layer selection."""
    return part.startswith((f"{FREEZE_BOTTOM}:", f"{LAYERS}:"))


def parse_layer_part(part: str, method: str) -> LayerSelection:
    """``"freeze-bottom:4"`` / ``"layers:2-5"`` → ``LayerSelection``; a malformed number or an
    empty range is one clear error (no model needed to tell)."""
    kind, _, value = part.partition(":")
    value = value.strip()
    if kind == FREEZE_BOTTOM:
        if not value.isdigit() or int(value) < 1:
            raise ForgetlessError(f"method '{method}': {FREEZE_BOTTOM}:N needs a whole number "
                                  f"N >= 1 of bottom layers to freeze, not {value!r}")
        return LayerSelection(bottom=int(value))
    match = _RANGE.match(value)
    if not match:
        raise ForgetlessError(f"method '{method}': {LAYERS}:a-b needs a 0-based layer range "
                              f"like layers:2-5 or layers:3, not {value!r}")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if last < first:
        raise ForgetlessError(f"method '{method}': {LAYERS}:{value} is an empty range "
                              f"({last} < {first})")
    return LayerSelection(first=first, last=last)


def layer_prefixes(model: nn.Module, selection: LayerSelection, method: str) -> list[str]:
    """Module names of the decoder layers the selection trains (after checking it fits)."""
    layers = text_layout(model).layers
    selection.check(len(layers), f"method '{method}' on {type(model).__name__}")
    return [name for i, name in enumerate(layers) if selection.trains_layer(i)]


def frozen_prefixes(model: nn.Module, selection: LayerSelection) -> list[str]:
    """Module names the selection freezes *outside* the layer list: the input embeddings for
    ``freeze-bottom`` (nothing for ``layers:``, which keeps only its layers anyway)."""
    if selection.bottom is None:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    embeddings = None
    for owner in (model, text_decoder(model)):
        getter = getattr(owner, "get_input_embeddings", None)
        try:
            embeddings = getter() if getter is not None else None
        except (AttributeError, NotImplementedError):
            embeddings = None
        if embeddings is not None and id(embeddings) in names:
            return [names[id(embeddings)]]
    return []


def within(name: str, prefixes: list[str]) -> bool:
    """Whether module/parameter ``name`` lies inside one of the modules named ``prefixes``."""
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def num_layers_of_config(config) -> int | None:
    """Decoder layers of a transformers config (a VLM's text config), if it says."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    return None
