"""Which coordinates of a tensor move: scores per filter and the top-k mask."""

from __future__ import annotations

import torch
from torch import Tensor

FILTERS = ("momentum", "gradient", "random")


def filter_scores(name: str, exp_avg: Tensor, grad: Tensor, seed: tuple[int, ...]) -> Tensor:
    """Ranking score per coordinate; larger moves first."""
    if name == "momentum":
        return exp_avg.abs()
    if name == "gradient":
        return grad.abs()
    generator = torch.Generator().manual_seed(hash(seed) & 0x7FFF_FFFF)
    return torch.rand(exp_avg.shape, generator=generator).to(exp_avg.device)


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly the k largest scores (ties to the lowest flat index)."""
    flat = scores.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order] = True
    return mask.view(scores.shape)
