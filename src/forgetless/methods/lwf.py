"""Learning without Forgetting (Li & Hoiem 2016), the data-free distillation baseline.

loss = CE + λ · KL(p_base ‖ p_model), averaged over the real (unpadded) positions of the
*training* batch, with ``p_base`` from a frozen copy of the model taken before any method
touches it. The copy costs one more set of weights and one extra forward pass per step (no
backward); both are measured (``base_bytes``, ``seconds``) and land in the run summary. The
narrow-retraining paper (Zhu et al. 2025) reports its selective recipes against LwF, which is
why it is a ``+lwf`` modifier of any method (``attn+lwf``) and not only of ``full``.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn


class LwFLoss:
    """Callable distillation term: ``lwf(logits, inputs) -> scalar`` to add to the loss.

    ``base`` is a deep copy (its own tensors: a shared tensor would move with training and the
    term would stay zero); it is frozen, kept in eval mode and follows the live logits' device.
    """

    def __init__(self, model: nn.Module, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"lwf weight must be >= 0, not {weight}")
        self.base = copy.deepcopy(model)
        self.base.requires_grad_(False)
        self.base.eval()
        self.weight = weight
        self.seconds = 0.0  # time spent in the base's forward passes (the time overhead)
        self.calls = 0

    @property
    def base_bytes(self) -> int:
        """Memory held by the frozen copy (the memory overhead)."""
        seen = {id(t): t for t in [*self.base.parameters(), *self.base.buffers()]}
        return sum(t.numel() * t.element_size() for t in seen.values())

    def __call__(self, logits: torch.Tensor, inputs: dict) -> torch.Tensor:
        started = time.perf_counter()
        device = logits.device
        if next(self.base.parameters()).device != device:
            self.base.to(device)
        batch = {k: v for k, v in inputs.items()
                 if k not in ("labels", "num_items_in_batch") and torch.is_tensor(v)}
        with torch.no_grad():
            base_logits = self.base(**batch).logits
        base_logp = F.log_softmax(base_logits.float(), dim=-1)
        logp = F.log_softmax(logits.float(), dim=-1)
        per_position = (base_logp.exp() * (base_logp - logp)).sum(-1)  # KL(base ‖ model)
        mask = inputs.get("attention_mask")
        if mask is None:
            kl = per_position.mean()
        else:
            mask = mask.to(per_position.dtype)
            kl = (per_position * mask).sum() / mask.sum().clamp(min=1.0)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return self.weight * kl

    def summary(self, train_seconds: float | None = None) -> dict:
        """Overhead figures for metrics.json: copy size, base-forward time and its share."""
        out = {"weight": self.weight, "base_bytes": self.base_bytes,
               "base_forward_seconds": round(self.seconds, 3), "steps": self.calls}
        if train_seconds:
            out["time_share"] = round(self.seconds / train_seconds, 4)
        return out

    def __repr__(self) -> str:
        return f"LwF(weight={self.weight}, base copy {self.base_bytes / 2**20:.0f} MiB)"
