"""Method names → what they train: a small registry, one entry per method.

A method is a base selection (``full``, ``lora``, a layer preset, or an anchored ``full``)
optionally combined with the MoFO optimizer by appending ``+mofo`` and/or with LwF distillation
from the frozen base by appending ``+lwf``; ``mofo`` / ``lwf`` alone mean ``full+mofo`` /
``full+lwf``. Canonical order: ``<base>+mofo+lwf``.
"""

from __future__ import annotations

from dataclasses import dataclass

from forgetless.errors import ForgetlessError


@dataclass(frozen=True)
class Method:
    """What a base method trains.

    ``roles`` names the projections of every decoder layer that train (see ``layout``); ``None``
    means the whole language model. ``lora`` puts PEFT LoRA adapters on those projections
    instead (``None`` then means the default attention + MLP targets). ``anchor`` is the norm
    (1 or 2) of a penalty pulling the trained weights back to their pre-trained values.
    """

    name: str
    help: str
    roles: frozenset[str] | None = None
    lora: bool = False
    anchor: int | None = None


@dataclass(frozen=True)
class MethodChoice:
    """A parsed method name: the base method, whether MoFO updates its parameters and whether
    an LwF term (KL to the frozen base) joins the loss."""

    name: str
    base: Method
    mofo: bool
    lwf: bool = False


MOFO = "mofo"
LWF = "lwf"
_MODIFIERS = (MOFO, LWF)

_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a base method (usable with and without ``+mofo``); names are lower case."""
    if "+" in method.name or method.name != method.name.lower() or method.name in _MODIFIERS:
        raise ValueError(f"invalid method name {method.name!r}")
    _METHODS[method.name] = method
    return method


for _method in (
    Method("full", "every parameter of the language model"),
    Method("lora", "PEFT LoRA adapters on the attention + MLP projections", lora=True),
    Method("attn", "self-attention q, k, v, o projections", frozenset("qkvo")),
    Method("attn-qkv", "self-attention q, k, v projections (o frozen)", frozenset("qkv")),
    Method("mlp", "MLP gate, up, down projections", frozenset({"gate", "up", "down"})),
    Method("mlp-gate-up", "MLP gate + up projections (down frozen)", frozenset({"gate", "up"})),
    Method("l2-anchor", "full tuning + L2 pull to the pre-trained weights", anchor=2),
    Method("l1-anchor", "full tuning + L1 pull to the pre-trained weights", anchor=1),
):
    register_method(_method)


def get_method(name: str) -> Method | None:
    """The registered base method called ``name``, if any."""
    return _METHODS.get(name)


def list_methods() -> list[str]:
    """Every accepted method name: each base, ``mofo``, ``lwf`` and each base with ``+mofo``,
    ``+lwf`` or ``+mofo+lwf``."""
    others = [name for name in _METHODS if name != "full"]
    return [*_METHODS, MOFO, LWF, *(f"{name}+{MOFO}" for name in others),
            *(f"{name}+{LWF}" for name in others), f"{MOFO}+{LWF}",
            *(f"{name}+{MOFO}+{LWF}" for name in others)]


def parse_method(name: str) -> MethodChoice:
    """``"attn+mofo"`` → ``MethodChoice(base=attn, mofo=True)``; ``"lwf+attn"`` →
    ``attn+lwf``; unknown names list the valid."""
    parts = [part.strip() for part in str(name).lower().split("+")]
    mofo, lwf = MOFO in parts, LWF in parts
    rest = [part for part in parts if part not in _MODIFIERS]
    if (mofo or lwf) and not rest:
        rest = ["full"]
    repeated = parts.count(MOFO) > 1 or parts.count(LWF) > 1
    if len(rest) != 1 or repeated or rest[0] not in _METHODS:
        raise ForgetlessError(f"unknown method '{name}' (valid: {', '.join(list_methods())})")
    canonical = rest[0] + (f"+{MOFO}" if mofo else "") + (f"+{LWF}" if lwf else "")
    return MethodChoice(name=canonical, base=_METHODS[rest[0]], mofo=mofo, lwf=lwf)
