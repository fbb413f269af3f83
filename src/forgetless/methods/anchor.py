"""A penalty that pulls trained weights back towards their pre-trained values (L2-SP style).

penalty = weight · Σ ‖θ − θ₀‖² (L2) or weight · Σ |θ − θ₀| (L1), summed over the *trainable*
parameters only; θ₀ is a frozen copy of just those, so memory grows with what trains. Added once
per optimizer step: the trainer splits it over the ``grad_accum`` micro-batches.

Each term is one ``F.mse_loss(θ, θ₀, reduction="sum")`` (L2) or ``torch.dist(θ, θ₀, 1)``
(L1; ``F.l1_loss`` is composite and saves the difference): autograd saves only θ and θ₀, which
exist anyway. ``(θ − θ₀).pow(2)`` saved the difference, a full-size copy of every trainable
tensor held from forward to backward (+28 GB on a 7B full fine-tune with float32 masters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AnchorPenalty:
    """Callable regulariser: ``penalty(model) -> scalar tensor`` to add to the training loss.

    It holds references to the trained parameters themselves, so it works unchanged when the
    trainer hands it a wrapped model (DDP, PEFT); the ``model`` argument only satisfies the
    uniform regulariser signature.
    """

    def __init__(self, params: list[nn.Parameter], weight: float, norm: int = 2) -> None:
        if norm not in (1, 2):
            raise ValueError(f"anchor norm must be 1 or 2, not {norm}")
        self.params = params
        self.anchors = [p.detach().clone() for p in params]
        self.weight = weight
        self.norm = norm

    def __call__(self, model: nn.Module | None = None) -> torch.Tensor:
        total = None
        for i, (param, anchor) in enumerate(zip(self.params, self.anchors, strict=True)):
            if anchor.device != param.device or anchor.dtype != param.dtype:
                anchor = self.anchors[i] = anchor.to(param.device, param.dtype)
            if self.norm == 2:
                term = F.mse_loss(param, anchor, reduction="sum")
            else:
                term = torch.dist(param, anchor, 1)
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return self.weight * total

    def __repr__(self) -> str:
        return f"AnchorPenalty(L{self.norm}, weight={self.weight}, tensors={len(self.params)})"
