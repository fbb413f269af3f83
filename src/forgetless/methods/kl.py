"""KL-anchored SFT: ``+kl``, ``+dft`` and ``+asft`` (= both), as LLaMA-Factory defines ASFT.

ASFT (anchored SFT; LLaMA-Factory PR #10174, ``use_asft_loss`` / ``asft_alpha``) is

    L_ASFT = L_DFT + α · KL(π_base ‖ π_θ),

    L_DFT  = (1/N) Σ_t  sg(p_θ(y_t | y_<t, x)) · (−log p_θ(y_t | y_<t, x)),
    KL     = (1/N) Σ_t  Σ_v π_base(v | ·) · (log π_base(v | ·) − log π_θ(v | ·)),

both sums over the N response (label ≠ −100) tokens, ``sg`` = stop-gradient: DFT ("dynamic
fine-tuning") scales each token's cross-entropy by its own detached probability, and the KL
over the full vocabulary to the frozen base keeps the model near where it started on the very
tokens it is being taught. RL's Razor (arXiv 2509.04259) found forgetting tracks this forward
KL on the new task's data, which is why ``+kl`` measures it there and not on a general set.

``+kl`` alone adds ``kl_weight · KL`` to the usual cross-entropy; ``kl_direction="reverse"``
uses KL(π_θ ‖ π_base) instead (mode-seeking: it penalises mass the model puts where the base
puts little). ``+dft`` alone swaps the cross-entropy for L_DFT. ``+lwf`` (lwf.py) differs from
``+kl`` in where it looks: every real position of the batch, prompt included.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forgetless.data import IGNORE_INDEX
from forgetless.methods.lwf import FrozenBase
from forgetless.methods.options import KL_DIRECTIONS


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them (position t predicts token t+1)."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def dft_loss(outputs: Any, labels: torch.Tensor,
             num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """L_DFT (module docstring), a ``Trainer.compute_loss_func``: the sum over this batch's
    response tokens divided by ``num_items_in_batch`` (the whole accumulated step's count, so
    micro-batches add up to the step's mean, as the model's own CE does) or by this batch's."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    target = shifted_labels(labels.to(logits.device))
    mask = target != IGNORE_INDEX
    nll = F.cross_entropy(logits[mask].float(), target[mask], reduction="none")
    weighted = (nll * torch.exp(-nll.detach())).sum()
    count = mask.sum() if num_items_in_batch is None else num_items_in_batch
    count = torch.as_tensor(count, device=weighted.device, dtype=weighted.dtype)
    return weighted / count.clamp(min=1)


def kl_per_token(logits: torch.Tensor, base_logits: torch.Tensor,
                 direction: str = "forward") -> torch.Tensor:
    """KL over the vocabulary per row of ``(n, V)`` logits: forward KL(base ‖ model) or
    reverse KL(model ‖ base), in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    base_logp = F.log_softmax(base_logits.float(), dim=-1)
    if direction == "forward":
        return (base_logp.exp() * (base_logp - logp)).sum(-1)
    return (logp.exp() * (logp - base_logp)).sum(-1)


class KLAnchor(FrozenBase):
    """Callable ``kl(logits, inputs, positions) -> weight · KL`` on the training tokens, with
    the same interface as ``LwFLoss`` so the trainer treats both alike.

    ``base`` is a frozen deep copy taken before any method touches the model (its own tensors:
    a shared one would move with training). Only the response positions' logits enter the
    float32 log-softmaxes, so the vocabulary-sized temporaries scale with the response tokens,
    not the whole padded batch.
    """

    name = "kl"

    def __init__(self, model: nn.Module, weight: float, direction: str = "forward") -> None:
        if direction not in KL_DIRECTIONS:
            raise ValueError(f"kl direction must be one of {KL_DIRECTIONS}, not {direction!r}")
        super().__init__(model, weight)
        self.direction = direction

    @staticmethod
    def positions(inputs: dict) -> torch.Tensor:
        """How many training tokens ``inputs`` holds (a tensor: no host sync)."""
        return (shifted_labels(inputs["labels"]) != IGNORE_INDEX).sum()

    def __call__(self, logits: torch.Tensor, inputs: dict,
                 positions: torch.Tensor | int | None = None) -> torch.Tensor:
        """weight · KL summed over this batch's training tokens / ``positions`` (default: this
        batch's count; the trainer passes the accumulated step's)."""
        started = time.perf_counter()
        device = logits.device
        mask = shifted_labels(inputs["labels"].to(device)) != IGNORE_INDEX
        base_logits = self.base_logits(inputs, device)[mask]
        total = kl_per_token(logits[mask], base_logits, self.direction).sum()
        count = torch.as_tensor(mask.sum() if positions is None else positions)
        kl = total / count.to(total.device, total.dtype).clamp(min=1)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return self.weight * kl

    def summary(self, train_seconds: float | None = None) -> dict:
        """The copy's overhead figures (``FrozenBase.summary``) and the KL's direction."""
        return {"direction": self.direction, **super().summary(train_seconds)}

    def __repr__(self) -> str:
        return (f"KL({self.direction}, weight={self.weight}, base copy "
                f"{self.base_bytes / 2**20:.0f} MiB)")
