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


@torch.no_grad()
def interpolate(base: nn.Module, tuned: nn.Module, lam: float) -> nn.Module:
    """A new model with weights ``base + lam * (tuned - base)``; both inputs stay unchanged."""
    tuned_params = dict(merged_copy(tuned).named_parameters())
    out = copy.deepcopy(base)
    for name, param in out.named_parameters():
        if name not in tuned_params:
            raise ForgetlessError(f"cannot interpolate: tuned model has no parameter {name}")
        other = tuned_params[name]
        if other.shape != param.shape:
            raise ForgetlessError(
                f"cannot interpolate {name}: shape {tuple(other.shape)} vs {tuple(param.shape)}"
            )
        param.add_(other.to(param.device, param.dtype) - param, alpha=lam)  # on θ₀'s device
    return out.eval()
