"""Learning without Forgetting (Li & Hoiem 2016), the data-free distillation baseline.

loss = CE + λ · KL(p_base ‖ p_model), averaged over the real (unpadded) positions of the
*training* batch (all micro-batches of an optimizer step under ``grad_accum``, as the CE is),
with ``p_base`` from a frozen copy of the model taken before any method touches it. The copy
costs one more set of weights and one extra forward pass per step (no backward); both are
measured (``base_bytes``, ``seconds``) and land in the run summary. The narrow-retraining
paper (Zhu et al. 2025) reports its selective recipes against LwF, which is why it is a
``+lwf`` modifier of any method (``attn+lwf``) and not only of ``full``.
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

    @staticmethod
    def positions(inputs: dict) -> torch.Tensor | int:
        """The positions the KL averages over in ``inputs``: the real (unpadded) tokens (a
        tensor on the mask's device: no host sync per micro-batch)."""
        mask = inputs.get("attention_mask")
        return mask.sum() if mask is not None else inputs["input_ids"].numel()

    def __call__(self, logits: torch.Tensor, inputs: dict,
                 positions: torch.Tensor | int | None = None) -> torch.Tensor:
        """λ · KL summed over this batch's real positions, divided by ``positions`` (by default
        this batch's own count; the trainer passes the count of the whole accumulated step, so
        the micro-batches' terms add up to the mean over the step, as the CE loss does)."""
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
        if mask is not None:
            per_position = per_position * mask.to(per_position.dtype)
        count = torch.as_tensor(self.positions(inputs) if positions is None else positions)
        kl = per_position.sum() / count.to(per_position.device, per_position.dtype).clamp(min=1)
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
