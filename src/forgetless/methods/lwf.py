"""Learning without Forgetting (Li & Hoiem 2016), the data-free distillation baseline.

loss = CE + λ · KL(p_base ‖ p_model), averaged over the real (unpadded) positions of the
*training* batch (all micro-batches of an optimizer step under ``grad_accum``, as the CE is),
with ``p_base`` from a frozen copy of the model taken before any method touches it. The copy
costs one more set of weights and one extra forward pass per step (no backward); both are
measured (``base_bytes``, ``seconds``) and land in the run summary. The narrow-retraining
paper (Zhu et al. 2025) reports its selective recipes against LwF, which is why it is a
``+lwf`` modifier of any method (``attn+lwf``) and not only of ``full``.

The KL runs over the sequence in chunks of at most ``CHUNK_ELEMENTS`` float32 values
(``kl_to_base``): the float32 log-softmaxes of model and base, ``batch × length × vocab`` each
(~4 GB apiece at 8 × 512 × 128k), never exist whole. Autograd keeps one tensor for the backward
pass, the gradient with respect to the logits in the logits' dtype, computed chunk by chunk in
the forward pass; the base's logits live only during that pass. ``forgetless plan`` counts both
(``lwf_activation_bytes``).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ELEMENTS = 1 << 22  # float32 values per chunk of the KL (16 MiB per temporary)


def chunk_rows(vocab: int) -> int:
    """Positions per chunk of the KL for a ``vocab``-sized output."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


class _ChunkedKL(torch.autograd.Function):
    """Σ_positions w · KL(softmax(base) ‖ softmax(logits)) over ``(positions, vocab)`` rows, in
    chunks of ``rows`` positions; the gradient (w · (p_model · Σp_base − p_base) per position,
    exactly the unchunked formula's) is computed in the forward pass and is all it saves."""

    @staticmethod
    def forward(ctx, logits, base_logits, weights, rows):
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        for start in range(0, logits.shape[0], rows):
            part = slice(start, start + rows)
            base_logp = F.log_softmax(base_logits[part].float(), dim=-1)
            logp = F.log_softmax(logits[part].float(), dim=-1)
            base_p = base_logp.exp()
            weight = weights[part]
            total += ((base_p * (base_logp - logp)).sum(-1) * weight).sum()
            if grad is not None:
                mass = base_p.sum(-1, keepdim=True)
                grad[part] = ((logp.exp_() * mass - base_p) * weight[:, None]).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if getattr(ctx, "used", False):  # retain_graph: the saved gradient is scaled already
            raise RuntimeError("the LwF term supports one backward pass per forward")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output), None, None, None  # in place: no second full-size copy


def kl_to_base(logits: torch.Tensor, base_logits: torch.Tensor, weights: torch.Tensor,
               rows: int | None = None) -> torch.Tensor:
    """Σ over positions of ``weights`` · KL(base ‖ model), ``(..., vocab)`` logits, computed in
    chunks of ``rows`` positions (default: ``chunk_rows(vocab)``); float32 scalar."""
    vocab = logits.shape[-1]
    return _ChunkedKL.apply(logits.reshape(-1, vocab), base_logits.reshape(-1, vocab),
                            weights.reshape(-1).float(), rows or chunk_rows(vocab))


class FrozenBase:
    """A loss term against a frozen copy of the base (``+lwf``, ``+kl``): the copy, its weight
    and what it costs (memory, forward time) for metrics.json.

    ``base`` is a deep copy (its own tensors: a shared tensor would move with training and the
    term would stay zero); it is frozen, kept in eval mode and follows the live logits' device.
    """

    name = "lwf"

    def __init__(self, model: nn.Module, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"{self.name} weight must be >= 0, not {weight}")
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

    @torch.no_grad()
    def base_logits(self, inputs: dict, device: torch.device) -> torch.Tensor:
        """The frozen copy's logits on the batch (the copy follows the live logits' device)."""
        if next(self.base.parameters()).device != device:
            self.base.to(device)
        batch = {k: v for k, v in inputs.items()
                 if k not in ("labels", "num_items_in_batch") and torch.is_tensor(v)}
        return self.base(**batch).logits

    def summary(self, train_seconds: float | None = None) -> dict:
        """Overhead figures for metrics.json: copy size, base-forward time and its share."""
        out = {"weight": self.weight, "base_bytes": self.base_bytes,
               "base_forward_seconds": round(self.seconds, 3), "steps": self.calls}
        if train_seconds:
            out["time_share"] = round(self.seconds / train_seconds, 4)
        return out


class LwFLoss(FrozenBase):
    """Callable distillation term: ``lwf(logits, inputs) -> scalar`` to add to the loss."""

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
        base_logits = self.base_logits(inputs, device)
        mask = inputs.get("attention_mask")
        weights = (mask.to(device, torch.float32) if mask is not None
                   else torch.ones(logits.shape[:-1], device=device))
        count = torch.as_tensor(self.positions(inputs) if positions is None else positions)
        weights = weights / count.to(device, torch.float32).clamp(min=1)
        kl = kl_to_base(logits, base_logits, weights)
        del base_logits
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return self.weight * kl

    def __repr__(self) -> str:
        return f"LwF(weight={self.weight}, base copy {self.base_bytes / 2**20:.0f} MiB)"
