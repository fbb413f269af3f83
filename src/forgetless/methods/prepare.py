"""The uniform entry point: ``prepare_model(model, "attn+mofo", options)``.

It sets ``requires_grad`` (or wraps the model with PEFT LoRA), counts what trains, builds the
anchor penalty if the method has one, and knows which optimizer the method needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from forgetless.errors import ForgetlessError
from forgetless.methods.anchor import AnchorPenalty
from forgetless.methods.ewc import EWCPenalty
from forgetless.methods.freeze import frozen_prefixes, layer_prefixes, within
from forgetless.methods.kl import KLAnchor, dft_loss
from forgetless.methods.layout import (
    ATTENTION_ROLES,
    MLP_ROLES,
    find_projections,
    language_model_modules,
    multimodal_parts,
    text_layout,
)
from forgetless.methods.lwf import LwFLoss
from forgetless.methods.options import MethodOptions
from forgetless.methods.registry import MethodChoice, get_method, parse_method


@dataclass
class PreparedModel:
    """A model ready to train with one method, plus what the training loop needs from it."""

    model: nn.Module
    method: MethodChoice
    options: MethodOptions
    trainable_names: list[str]
    trainable: int
    total: int
    regularizer: AnchorPenalty | EWCPenalty | None = None
    # ``+lwf``: KL to a frozen copy of the base on the batch; ``+kl``: on its response tokens
    distiller: LwFLoss | KLAnchor | None = None
    loss_func: Any = None  # ``+dft``: replaces the CE (a Trainer ``compute_loss_func``)
    lora_targets: list[str] = field(default_factory=list)
    parts: dict[str, int] = field(default_factory=dict)  # VLM: trainable count per part

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def summary(self) -> str:
        optimizer = (
            f"MoFO(fraction={self.options.fraction}, filter={self.options.mofo_filter}"
            f"{', exact' if self.options.mofo_exact else ''})"
            if self.method.mofo
            else "AdamW"
        )
        extra = f", {self.regularizer!r}" if self.regularizer is not None else ""
        extra += f", {self.distiller!r}" if self.distiller is not None else ""
        extra += ", DFT-weighted loss" if self.loss_func is not None else ""
        if self.parts:  # a VLM: say which of its parts train
            extra += "; trains " + ", ".join(
                f"{part} {count:,}" if count else f"{part} frozen"
                for part, count in self.parts.items())
        return (
            f"{self.method.name} on {_class_name(self.model)}: {self.trainable:,} of "
            f"{self.total:,} parameters trainable ({100 * self.share:.2f}%), {optimizer}{extra}"
        )

    def make_optimizer(
        self,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> torch.optim.Optimizer:
        """AdamW, or MoFO for ``+mofo`` methods, over the trainable parameters.

        Matrices get ``weight_decay``; vectors (biases, norm scales) get none, as usual.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        groups = [group for group in groups if group["params"]]
        if not self.method.mofo:
            return adamw(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        try:
            from forgetless.optim.distributed import ShardedMoFO as MoFO  # = MoFO on whole tensors
        except ImportError as err:  # pragma: no cover - MoFO ships with forgetless
            raise ForgetlessError(f"method '{self.method.name}' needs MoFO: {err}") from err
        try:
            return MoFO(
                groups,
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                fraction=self.options.fraction,
                filter=self.options.mofo_filter,
                exact=self.options.mofo_exact,
            )
        except ValueError as err:
            raise ForgetlessError(f"method '{self.method.name}': {err}") from err


def adamw(groups: list[dict], **hyper) -> torch.optim.AdamW:
    """``torch.optim.AdamW``, fused when every parameter is on CUDA (one kernel per step
    for the group instead of foreach's ~77 ops: ``bench/device_traffic.py``), foreach when
    torch refuses fused there; elsewhere torch's own default (CPU: the single-tensor loop)."""
    params = [p for group in groups for p in group["params"]]
    if params and all(p.device.type == "cuda" for p in params):
        try:
            return torch.optim.AdamW(groups, fused=True, **hyper)
        except (RuntimeError, ValueError):  # a dtype or device fused has no kernel for
            return torch.optim.AdamW(groups, foreach=True, **hyper)
    return torch.optim.AdamW(groups, **hyper)


def _class_name(model: nn.Module) -> str:
    base = getattr(model, "get_base_model", None)
    return type(base() if callable(base) else model).__name__


def _lora_targets(model: nn.Module, options: MethodOptions, method: str) -> list[str]:
    """Full module names for PEFT, all inside the language model (never a vision tower)."""
    targets = options.lora_targets
    if targets is None:
        return find_projections(model, ATTENTION_ROLES | MLP_ROLES, method)
    preset = get_method(targets) if isinstance(targets, str) else None
    if preset is not None and preset.roles is not None:  # e.g. lora_targets="attn"
        return find_projections(model, preset.roles, method)
    suffixes = [targets] if isinstance(targets, str) else list(targets)
    modules = dict(model.named_modules())
    roots = language_model_modules(model)
    inside = [
        name
        for root in roots
        for name, module in modules[root].named_modules(prefix=root)
        if not list(module.children())
    ]
    names = [n for n in inside if any(n == s or n.endswith(f".{s}") for s in suffixes)]
    if not names:
        raise ForgetlessError(
            f"method '{method}' on {type(model).__name__}: lora_targets {suffixes} match no "
            f"module of the language model"
        )
    return names


def _apply_lora(model: nn.Module, options: MethodOptions, method: str,
                layers: list[str] | None = None):
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = _lora_targets(model, options, method)
    if layers is not None:  # ``+layers:`` / ``+freeze-bottom:``: adapters in those layers only
        targets = [name for name in targets if within(name, layers)]
        if not targets:
            raise ForgetlessError(f"method '{method}': no LoRA target inside the selected "
                                  "layers")
    modules = dict(model.named_modules())
    config = LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=targets,
        # GPT-2's Conv1D stores weights transposed.
        fan_in_fan_out=any(isinstance(modules[name], Conv1D) for name in targets),
        bias="none",
    )
    try:
        return get_peft_model(model, config), targets
    except ValueError as err:
        raise ForgetlessError(f"method '{method}': PEFT refused the LoRA targets: {err}") from err


def _in_layers(model: nn.Module, selected: list[nn.Parameter], choice: MethodChoice,
               keep: list[str]) -> list[nn.Parameter]:
    """The base's ``selected`` parameters narrowed by the layer selection (freeze.py):
    ``layers:a-b`` keeps only those inside the kept layers; ``freeze-bottom:N`` drops those
    inside the frozen layers and the input embeddings (a tied head goes with them)."""
    layers = text_layout(model).layers
    frozen = [name for name in layers if name not in keep] + frozen_prefixes(model, choice.layers)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)
             if within(n, frozen)}  # every name of a tied tensor counts
    if choice.layers.bottom is None:
        inside = {id(p) for n, p in model.named_parameters(remove_duplicate=False)
                  if within(n, keep)}
        out = [p for p in selected if id(p) in inside]
    else:
        out = [p for p in selected if id(p) not in names]
    if not out:
        raise ForgetlessError(f"method '{choice.name}' on {_class_name(model)}: nothing of "
                              f"{choice.base.name} lies in the layers {choice.layers.name} "
                              "leaves training")
    return out


def _parameters_of(model: nn.Module, module_names: list[str]) -> list[nn.Parameter]:
    modules = dict(model.named_modules())
    seen: dict[int, nn.Parameter] = {}
    for name in module_names:
        for param in modules[name].parameters():
            seen.setdefault(id(param), param)
    return list(seen.values())


def prepare_model(
    model: nn.Module, method: str, options: MethodOptions | None = None
) -> PreparedModel:
    """Make only ``method``'s parameters trainable (or add LoRA adapters) and describe the result.

    ``model`` is changed in place (``requires_grad`` flags, or LoRA layers injected by PEFT);
    use ``prepared.model``, which is the PEFT wrapper for ``lora`` methods.

    ``full`` trains the whole language model: embeddings, norms, every layer and the LM head.
    On a vision-language model (LLaVA, Qwen2.5-VL) every method touches the language model
    only; the vision tower and multimodal projector stay frozen, as in Zhu et al. (2025),
    unless ``options`` unfreezes them (then they train whole, next to the method's choice).
    """
    options = options or MethodOptions()
    choice = parse_method(method)
    base = choice.base
    lora_targets: list[str] = []
    text_layout(model)  # fail early and clearly on a model we cannot read
    unfrozen = _unfrozen_parts(model, options, choice.name)
    # The base copy is taken before LoRA wraps or anything trains: it is the pre-trained model.
    distiller = (LwFLoss(model, options.lwf_weight) if choice.lwf else
                 KLAnchor(model, options.kl_weight, options.kl_direction) if choice.kl else None)
    keep = layer_prefixes(model, choice.layers, choice.name) if choice.layers else None
    if base.lora:
        if options.freeze_language_model:
            raise ForgetlessError(f"method '{choice.name}' adapts the language model; "
                                  "freeze_language_model=true leaves it nothing to train")
        if unfrozen:
            raise ForgetlessError(
                f"method '{choice.name}' with an unfrozen {' and '.join(unfrozen)}: not "
                "supported (the saved adapter would not hold them); use a non-LoRA method")
        model, lora_targets = _apply_lora(model, options, choice.name, keep)
    else:
        modules = (
            language_model_modules(model)
            if base.roles is None
            else find_projections(model, base.roles, choice.name)
        )
        selected = [] if options.freeze_language_model else _parameters_of(model, modules)
        if choice.layers is not None and selected:
            selected = _in_layers(model, selected, choice, keep)
        model.requires_grad_(False)
        for param in selected + [p for params in unfrozen.values() for p in params]:
            param.requires_grad_(True)
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if not trainable:
        raise ForgetlessError(f"method '{choice.name}' on {_class_name(model)}: nothing trains")
    regularizer = None
    if base.anchor is not None:
        regularizer = AnchorPenalty([p for _, p in trainable], options.anchor_weight, base.anchor)
    elif choice.ewc:  # its Fisher is estimated by the trainer, on data (train.py)
        regularizer = EWCPenalty([p for _, p in trainable], [n for n, _ in trainable],
                                 options.ewc_lambda)
    return PreparedModel(
        model=model,
        method=choice,
        options=options,
        trainable_names=[n for n, _ in trainable],
        trainable=sum(p.numel() for _, p in trainable),
        total=sum(p.numel() for _, p in named),
        regularizer=regularizer,
        distiller=distiller,
        loss_func=dft_loss if choice.dft else None,
        lora_targets=lora_targets,
        parts=_part_counts(model),
    )


def _unfrozen_parts(model: nn.Module, options: MethodOptions,
                    method: str) -> dict[str, list[nn.Parameter]]:
    """The VLM parts the options unfreeze; unfreezing a part the model lacks is an error."""
    parts = multimodal_parts(model)
    wanted = {"vision tower": ("vision", options.freeze_vision_tower),
              "multimodal projector": ("projector", options.freeze_multi_modal_projector)}
    out = {}
    for label, (key, frozen) in wanted.items():
        if frozen:
            continue
        if not parts[key]:
            raise ForgetlessError(f"method '{method}' on {_class_name(model)}: the model has no "
                                  f"{label} to unfreeze")
        out[label] = parts[key]
    return out


def _part_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters in the language model, vision tower and projector of a VLM
    (empty for a text model), for the trainable-parameter line."""
    parts = multimodal_parts(model)
    if not parts["vision"] and not parts["projector"]:
        return {}
    side = {id(p) for params in parts.values() for p in params}
    counts = {"language": sum(p.numel() for p in model.parameters()
                              if p.requires_grad and id(p) not in side)}
    for key in ("vision", "projector"):
        counts[key] = sum(p.numel() for p in parts[key] if p.requires_grad)
    return counts


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the base weights (PEFT ``merge_and_unload``) for saving.

    A model without adapters comes back unchanged, so callers need not check the method.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
