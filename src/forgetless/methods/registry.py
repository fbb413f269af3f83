"""Method names → what they train: a small registry, one entry per method.

A method is a base selection (``full``, ``lora``, a layer preset, or an anchored ``full``)
optionally combined with modifiers, each appended with ``+``:

* ``+freeze-bottom:N`` / ``+layers:a-b``: only some decoder layers train (``freeze``);
* ``+mofo``: the MoFO optimizer;
* ``+lwf``: LwF distillation, KL(base ‖ model) on every real position of the batch;
* ``+kl``: KL to the frozen base on the training (response) tokens only, forward or reverse
  (``kl_direction``); ``+dft``: DFT token re-weighting of the cross-entropy; ``+asft`` = both,
  as LLaMA-Factory's ASFT (``kl``);
* ``+ewc``: the EWC penalty with a diagonal Fisher of the base (``ewc``).

A modifier alone (``mofo``, ``lwf``, ``asft``, ...) means ``full`` with it. Canonical order:
``<base>[+freeze-bottom:N|+layers:a-b][+mofo][+lwf][+dft|+kl|+asft][+ewc]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from forgetless.errors import ForgetlessError
from forgetless.methods.freeze import LayerSelection, is_layer_part, parse_layer_part
from forgetless.methods.options import USED_BY


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
    """A parsed method name: the base method, whether MoFO updates its parameters, which terms
    join the loss (LwF, KL on the training tokens, DFT re-weighting, EWC) and which decoder
    layers may train (``layers``; ``None`` = all)."""

    name: str
    base: Method
    mofo: bool
    lwf: bool = False
    kl: bool = False
    dft: bool = False
    ewc: bool = False
    layers: LayerSelection | None = None


MOFO = "mofo"
LWF = "lwf"
KL = "kl"
DFT = "dft"
ASFT = "asft"  # = dft + kl
EWC = "ewc"
_MODIFIERS = (MOFO, LWF, KL, DFT, ASFT, EWC)

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
    """Method names to show: each base, ``mofo``, ``lwf`` and each base with ``+mofo``,
    ``+lwf`` or ``+mofo+lwf``, then the newer modifiers alone and on each base (any
    combination of modifiers parses; see ``parse_method``)."""
    others = [name for name in _METHODS if name != "full"]
    newer = (KL, DFT, ASFT, EWC)
    return [*_METHODS, MOFO, LWF, *(f"{name}+{MOFO}" for name in others),
            *(f"{name}+{LWF}" for name in others), f"{MOFO}+{LWF}",
            *(f"{name}+{MOFO}+{LWF}" for name in others), *newer,
            *(f"{name}+{mod}" for mod in newer for name in others)]


def _valid() -> str:
    return (f"valid: a base method ({', '.join(_METHODS)}), optionally with +mofo, +lwf, +kl, "
            "+dft, +asft, +ewc, +freeze-bottom:N or +layers:a-b; a modifier alone means full "
            "with it")


def _unknown(name: str) -> ForgetlessError:
    return ForgetlessError(f"unknown method '{name}' ({_valid()})")


def _clash(name: str, why: str) -> ForgetlessError:
    return ForgetlessError(f"method '{name}': {why}")


def parse_method(name: str) -> MethodChoice:
    """``"attn+mofo"`` → ``MethodChoice(base=attn, mofo=True)``; ``"lwf+attn"`` →
    ``attn+lwf``; ``"asft"`` → ``full+asft`` (dft and kl); unknown names list the valid."""
    parts = [part.strip() for part in str(name).lower().split("+")]
    layer_parts = [part for part in parts if is_layer_part(part)]
    parts = [part for part in parts if not is_layer_part(part)]
    flags = {mod: mod in parts for mod in _MODIFIERS}
    rest = [part for part in parts if part not in _MODIFIERS]
    if (any(flags.values()) or layer_parts) and not rest:
        rest = ["full"]
    repeated = any(parts.count(mod) > 1 for mod in _MODIFIERS)
    if len(rest) != 1 or repeated or rest[0] not in _METHODS:
        raise _unknown(name)
    if len(layer_parts) > 1:
        raise _clash(name, "one layer selection at most")
    layers = parse_layer_part(layer_parts[0], name) if layer_parts else None
    dft = flags[DFT] or flags[ASFT]
    kl = flags[KL] or flags[ASFT]
    if flags[ASFT] and (flags[DFT] or flags[KL]):
        raise _clash(name, "asft already is dft+kl")
    if kl and flags[LWF]:
        raise _clash(name, "+lwf and +kl both distil from the base; pick one")
    base = _METHODS[rest[0]]
    if flags[EWC] and base.anchor is not None:
        raise _clash(name, f"{base.name} and +ewc are both penalties towards the base; "
                       "pick one")
    if flags[EWC] and base.lora:
        raise _clash(name, "+ewc penalises moving the base weights, which LoRA leaves "
                       "frozen; use a non-LoRA method")
    loss = ASFT if dft and kl else DFT if dft else KL if kl else None
    canonical = "+".join([rest[0], *([layers.name] if layers else []),
                          *([MOFO] if flags[MOFO] else []), *([LWF] if flags[LWF] else []),
                          *([loss] if loss else []), *([EWC] if flags[EWC] else [])])
    return MethodChoice(name=canonical, base=base, mofo=flags[MOFO], lwf=flags[LWF], kl=kl,
                        dft=dft, ewc=flags[EWC], layers=layers)


# The options only some methods read, and the test for "this method reads it" (tune samples
# such an option only for the methods that use it; everything else applies to every method).
_READERS = {"mofo": lambda c: c.mofo, "lora": lambda c: c.base.lora,
            "anchor": lambda c: c.base.anchor is not None, "kl": lambda c: c.kl,
            "ewc": lambda c: c.ewc}


def uses_option(method: str, key: str) -> bool:
    """Whether ``method`` reads option ``key`` (``True`` for options every method reads)."""
    reader = USED_BY.get(key)
    return True if reader is None else bool(_READERS[reader](parse_method(method)))
