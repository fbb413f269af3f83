"""Find the projections a preset trains by walking the model's structure, not by regex.

Decoder LLMs agree on a shape: a text decoder holding a list of layers, each with an attention
child and an MLP child, each of those holding a few projections. Only the projection *names*
differ between families, and some families fuse several projections into one module (Phi-3's
``qkv_proj`` and ``gate_up_proj``, GPT-2's ``c_attn``). So we locate the text decoder (never a
VLM's vision tower or projector), find its layer list, and look up each projection by name in
small tables that say which roles (q, k, v, o, gate, up, down) a module holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from forgetless.errors import ForgetlessError

ATTENTION_CHILDREN = ("self_attn", "attn", "attention", "self_attention")
MLP_CHILDREN = ("mlp", "feed_forward", "ffn")
# Children that belong to a multimodal model's non-text side; a text decoder never holds them.
NON_TEXT_CHILDREN = (
    "vision_tower",
    "visual",
    "vision_model",
    "multi_modal_projector",
    "mm_projector",
    "audio_tower",
)

QKV = frozenset({"q", "k", "v"})
ATTENTION_ROLES = frozenset({"q", "k", "v", "o"})
MLP_ROLES = frozenset({"gate", "up", "down"})

# Module name -> the roles it holds; a fused module holds several.
ATTENTION_PROJECTIONS: dict[str, frozenset[str]] = {
    "q_proj": frozenset({"q"}),
    "k_proj": frozenset({"k"}),
    "v_proj": frozenset({"v"}),
    "query": frozenset({"q"}),
    "key": frozenset({"k"}),
    "value": frozenset({"v"}),
    "qkv_proj": QKV,  # Phi-3
    "c_attn": QKV,  # GPT-2
    "query_key_value": QKV,  # GPT-NeoX, Falcon
    "Wqkv": QKV,
    "o_proj": frozenset({"o"}),
    "out_proj": frozenset({"o"}),
    "dense": frozenset({"o"}),  # Phi-1/2, GPT-NeoX, Falcon
    "c_proj": frozenset({"o"}),  # GPT-2 attn.c_proj
}
MLP_PROJECTIONS: dict[str, frozenset[str]] = {
    "gate_proj": frozenset({"gate"}),
    "up_proj": frozenset({"up"}),
    "gate_up_proj": frozenset({"gate", "up"}),  # Phi-3
    "c_fc": frozenset({"up"}),  # GPT-2: the input projection of an ungated MLP
    "fc1": frozenset({"up"}),
    "dense_h_to_4h": frozenset({"up"}),
    "down_proj": frozenset({"down"}),
    "c_proj": frozenset({"down"}),  # GPT-2 mlp.c_proj
    "fc2": frozenset({"down"}),
    "dense_4h_to_h": frozenset({"down"}),
}
# An ungated MLP (GPT-2, Phi-2, ...) has no gate; its input projection plays "up".
OPTIONAL_ROLES = frozenset({"gate"})


@dataclass(frozen=True)
class TextLayout:
    """Where the trainable language-model side of ``model`` lives (module names from the root)."""

    decoder: str  # e.g. "model", "transformer", "model.language_model"
    layers: list[str]  # e.g. ["model.layers.0", ...]
    output: str | None  # the LM head, e.g. "lm_head"


def _names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules(remove_duplicate=False)}


def text_decoder(model: nn.Module) -> nn.Module:
    """The text decoder (embeddings + layers + final norm), excluding any vision tower."""
    decoder = None
    if hasattr(model, "get_decoder"):
        try:
            decoder = model.get_decoder()
        except (AttributeError, NotImplementedError, TypeError):
            decoder = None
    if decoder is None or decoder is model:
        base = getattr(model, "base_model", model)
        decoder = getattr(base, "language_model", base)
    # Some multimodal classes return their whole base model; step into the text side then.
    if any(hasattr(decoder, child) for child in NON_TEXT_CHILDREN):
        decoder = getattr(decoder, "language_model", None)
        if decoder is None or any(hasattr(decoder, child) for child in NON_TEXT_CHILDREN):
            raise ForgetlessError(
                f"{type(model).__name__}: cannot separate the language model from its "
                "vision/audio modules (looked for get_decoder() and .language_model)"
            )
    return decoder


def _first_child(module: nn.Module, candidates: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name in candidates:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None


def text_layout(model: nn.Module) -> TextLayout:
    """Locate the decoder, its layer list and the LM head of ``model``."""
    decoder = text_decoder(model)
    names = _names(model)
    for module in decoder.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and _first_child(module[0], ATTENTION_CHILDREN) is not None
        ):
            prefix = names[id(module)]
            layers = [f"{prefix}.{i}" for i in range(len(module))]
            break
    else:
        raise ForgetlessError(
            f"{type(model).__name__}: found no decoder layers (a list of blocks with one of "
            f"{', '.join(ATTENTION_CHILDREN)})"
        )
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return TextLayout(
        decoder=names[id(decoder)],
        layers=layers,
        output=names.get(id(output)) if output is not None else None,
    )


def find_projections(model: nn.Module, roles: frozenset[str], method: str) -> list[str]:
    """Names of the projection modules that hold exactly the requested ``roles`` in every layer.

    A fused module is taken only if every role it holds was requested; a fused module holding
    a mix of requested and unrequested roles cannot be split and is an error, as is a requested
    role no layer provides (except ``gate``, absent by design from ungated MLPs).
    """
    layout = text_layout(model)
    modules = dict(model.named_modules())
    selected: list[str] = []
    parts = (
        ("attention", ATTENTION_CHILDREN, ATTENTION_PROJECTIONS, roles & ATTENTION_ROLES),
        ("MLP", MLP_CHILDREN, MLP_PROJECTIONS, roles & MLP_ROLES),
    )
    where = f"method '{method}' on {type(model).__name__}"
    for layer_name in layout.layers:
        layer = modules[layer_name]
        for part, children, table, wanted in parts:
            if not wanted:
                continue
            found = _first_child(layer, children)
            # OPT-style layers keep their MLP projections directly on the layer.
            child_name, container = found if found else ("", layer)
            prefix = f"{layer_name}.{child_name}" if child_name else layer_name
            covered: set[str] = set()
            for name, _ in container.named_children():
                held = table.get(name)
                if held is None or not held & wanted:
                    continue
                if not held <= wanted:
                    raise ForgetlessError(
                        f"{where}: {prefix}.{name} fuses {'+'.join(sorted(held))} into one "
                        f"module and cannot train only {'+'.join(sorted(held & wanted))}"
                    )
                selected.append(f"{prefix}.{name}")
                covered |= held
            missing = wanted - covered - OPTIONAL_ROLES
            if missing:
                looked = sorted(n for n, held in table.items() if held & missing)
                raise ForgetlessError(
                    f"{where}: no {'/'.join(sorted(missing))} projection in the {part} of "
                    f"{layer_name} (looked for {', '.join(looked)} under "
                    f"{' or '.join(children)})"
                )
    if not selected:
        raise ForgetlessError(
            f"{where}: matched no modules (looked for {'/'.join(sorted(roles))} projections "
            f"in {len(layout.layers)} decoder layers)"
        )
    return selected


def language_model_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose parameters make up the whole language model (decoder + head)."""
    layout = text_layout(model)
    return [layout.decoder] + ([layout.output] if layout.output else [])


# A VLM's non-text parts, named as LLaMA-Factory names them: the vision tower (image encoder)
# and the multimodal projector (image features -> language embeddings). Qwen2-VL keeps its
# projector (``merger``) inside ``visual``; it counts as the projector, not the tower.
VISION_MODULES = ("vision_tower", "vision_model", "visual", "image_encoder")
PROJECTOR_MODULES = ("multi_modal_projector", "mm_projector", "connector", "visual.merger")


def multimodal_parts(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters of the ``vision`` tower and the ``projector`` (both empty on a text model).

    Found by module name (the outermost match), so a PEFT wrapper's prefixes do not matter.
    """
    modules = list(model.named_modules())

    def outermost(suffixes: tuple[str, ...]) -> list[str]:
        names = [n for n, _ in modules
                 if any(n == s or n.endswith(f".{s}") for s in suffixes)]
        return [n for n in names if not any(n.startswith(f"{o}.") for o in names if o != n)]

    by_name = dict(modules)
    projector = {id(p): p for n in outermost(PROJECTOR_MODULES)
                 for p in by_name[n].parameters()}
    vision = {id(p): p for n in outermost(VISION_MODULES) for p in by_name[n].parameters()
              if id(p) not in projector}
    return {"vision": list(vision.values()), "projector": list(projector.values())}
