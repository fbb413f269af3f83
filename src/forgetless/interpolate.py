"""Weight interpolation between a base model and its fine-tune: θ(λ) = θ₀ + λ(θ − θ₀).

Walking λ from 0 to 1 traces how target skill and forgetting grow together; a point short of
λ = 1 often keeps most of the gain with much less forgetting (WiSE-FT, Wortsman et al. 2022).
A LoRA model is merged first, so its interpolation moves the full merged weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from forgetless.errors import ForgetlessError


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain (adapter-free) copy of ``model``: LoRA adapters folded in, the original untouched."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model


def paired_parameters(base: nn.Module, tuned: nn.Module, verb: str):
    """A copy of ``base`` and, per parameter of it, ``(name, copy's parameter, tuned's)``: the
    walk interpolation and merging share (LoRA folded first; a missing or reshaped parameter is
    one error naming ``verb``)."""
    tuned_params = dict(merged_copy(tuned).named_parameters())
    out = copy.deepcopy(base)

    def pairs():
        for name, param in out.named_parameters():
            if name not in tuned_params:
                raise ForgetlessError(f"cannot {verb}: tuned model has no parameter {name}")
            other = tuned_params[name]
            if other.shape != param.shape:
                raise ForgetlessError(
                    f"cannot {verb} {name}: shape {tuple(other.shape)} vs {tuple(param.shape)}"
                )
            yield name, param, other

    return out, pairs()


@torch.no_grad()
def interpolate(base: nn.Module, tuned: nn.Module, lam: float) -> nn.Module:
    """A new model with weights ``base + lam * (tuned - base)``; both inputs stay unchanged."""
    out, pairs = paired_parameters(base, tuned, "interpolate")
    for _, param, other in pairs:
        param.add_(other.to(param.device, param.dtype) - param, alpha=lam)  # on θ₀'s device
    return out.eval()
