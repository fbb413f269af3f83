"""MoFO: AdamW that moves only the coordinates with the largest momentum (Chen et al., 2024).

The dense Adam moments are updated exactly as AdamW updates them; the difference is which
coordinates of each parameter tensor take the step. Keeping most weights at their pre-trained
values each step is what limits forgetting, at no extra state compared with AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from forgetless.optim.select import FILTERS, filter_scores, topk_mask

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


class MoFO(torch.optim.Optimizer):
    """AdamW whose step, in every tensor with two or more dims, touches only the top ``fraction``.

    Args:
        params: tensors or param groups, as for ``torch.optim.AdamW``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        fraction: share of each filtered tensor's coordinates that move per step, in (0, 1];
            ``k = max(1, round(fraction * numel))``. ``1.0`` is exactly AdamW.
        filter: how coordinates are ranked: ``"momentum"`` (|first moment|, the paper's MoFO),
            ``"gradient"`` (|current gradient|) or ``"random"`` (uniform, a seeded ablation).
        decay_frozen: ``False`` (default) applies weight decay only to the coordinates that move,
            so frozen weights stay exactly at their values. ``True`` decays every coordinate, the
            behaviour of the authors' reference code.
        filter_1d: also filter 1-D tensors (norm weights, biases); by default they take a plain
            AdamW step, as in the paper.
        exact: select exactly the top-k set (ties broken by lowest flat index) instead of the
            fast threshold whose count may differ from k by a small documented tolerance.
        track_masks: store the number of coordinates that moved at the last step as
            ``state[p]["moved"]`` (an int64 scalar tensor) for every parameter.
        seed: seed of the ``"random"`` filter; the mask of step t is a function of (seed, t).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        fraction: float = 0.1,
        filter: str = "momentum",
        decay_frozen: bool = False,
        filter_1d: bool = False,
        exact: bool = False,
        seed: int = 0,
        *,
        track_masks: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"MoFO: invalid learning rate {lr} (must be >= 0)")
        if eps < 0.0:
            raise ValueError(f"MoFO: invalid eps {eps} (must be >= 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"MoFO: invalid betas {betas} (each must be in [0, 1))")
        if weight_decay < 0.0:
            raise ValueError(f"MoFO: invalid weight_decay {weight_decay} (must be >= 0)")
        _check_fraction(fraction)
        _check_filter(filter)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            fraction=fraction,
            filter=filter,
            decay_frozen=decay_frozen,
            filter_1d=filter_1d,
            exact=exact,
            seed=seed,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_fraction(group["fraction"])
            _check_filter(group["filter"])
        self.track_masks = track_masks

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One MoFO step; ``closure`` re-evaluates the loss, as for every torch optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("MoFO does not support sparse gradients")
                self._update(param, group, index)
        return loss

    def _update(self, param: Tensor, group: dict[str, Any], index: int) -> None:
        grad = param.grad
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        state["step"] += 1
        step = state["step"].item()

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5

        mask = None
        if param.dim() >= 2 or group["filter_1d"]:
            k = max(1, round(group["fraction"] * param.numel()))
            if k < param.numel():
                scores = filter_scores(
                    group["filter"], exp_avg, grad, seed=(group["seed"], index, int(step))
                )
                mask = topk_mask(scores, k)
        if self.track_masks:
            moved = param.numel() if mask is None else int(mask.sum())
            state["moved"] = torch.tensor(moved, dtype=torch.int64)

        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        if mask is None:
            param.mul_(1 - lr * weight_decay)
            param.addcdiv_(exp_avg, denom, value=-step_size)
            return
        if group["decay_frozen"]:
            param.mul_(1 - lr * weight_decay)
        else:
            param.sub_(param * mask, alpha=lr * weight_decay)
        param.addcdiv_(exp_avg * mask, denom, value=-step_size)


def _check_fraction(fraction: float) -> None:
    if not (isinstance(fraction, int | float) and 0.0 < fraction <= 1.0):
        raise ValueError(f"MoFO: fraction must be in (0, 1], got {fraction!r}")


def _check_filter(name: str) -> None:
    if name not in FILTERS:
        raise ValueError(f"MoFO: unknown filter {name!r}; choose one of {', '.join(FILTERS)}")
