"""The MoFO passes in plain torch ops: any device and dtype, and the tests' mirror of the kernels.

Same interface and arithmetic as ``kernel.Batch`` (one object per parameter group and step),
but per tensor and with full-size temporaries, so it is the slow, portable path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from forgetless.optim.select import BINS, histogram, sample_bracket

SAMPLE_SIZE = 2048  # keys sampled per tensor to bracket its threshold
SAMPLE_RUN = 8  # ... read in runs of 8 neighbours (one cache line)

MASK32 = 0xFFFF_FFFF


def mix32(x: Tensor) -> Tensor:
    """The kernels' 32-bit integer hash (lowbias32), on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def float_bits(values: Tensor) -> Tensor:
    """Bit patterns of |values| as float32, as int64: integer order equals numeric order."""
    return values.detach().abs().float().view(torch.int32).to(torch.int64) & 0x7FFF_FFFF


def hash_bits(index: Tensor, seed: int) -> Tensor:
    """Seeded uniform [0, 1) keys of flat indices (the ``random`` filter), as bit patterns."""
    key = (mix32((index + seed) & MASK32) >> 8).float() * (1.0 / 16777216.0)
    return float_bits(key)


def key_bits(mode: int, exp_avg: Tensor, grad: Tensor, seed: int) -> Tensor:
    """Ranking keys of one tensor (0 momentum, 1 gradient, 2 random), flat int64 bit patterns."""
    if mode == 0:
        return float_bits(exp_avg.reshape(-1))
    if mode == 1:
        return float_bits(grad.reshape(-1))
    return hash_bits(torch.arange(exp_avg.numel(), device=exp_avg.device), seed)


class TorchBatch:
    """``kernel.Batch`` in torch ops."""

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, mode: int, seeds: list[int]):
        self.p, self.g, self.m, self.v = params, grads, exp_avgs, exp_avg_sqs
        self.mode, self.seeds = mode, seeds

    def keys(self, row: int) -> Tensor:
        return key_bits(self.mode, self.m[row], self.g[row], self.seeds[row]).cpu()

    def bracket(self, rows: Tensor, beta1: float, shares: Tensor) -> tuple[Tensor, Tensor]:
        """Local first brackets (lo, hi) of the given tensors, from sampled keys."""
        brackets = []
        for row in rows.tolist():
            m, g, seed = self.m[row].reshape(-1), self.g[row].reshape(-1), self.seeds[row]
            n = m.numel()
            if n <= SAMPLE_SIZE:
                index = torch.arange(n)
            else:
                runs = torch.arange(SAMPLE_SIZE // SAMPLE_RUN)
                stride = n // len(runs)
                jitter = mix32(runs ^ seed) % (stride - SAMPLE_RUN + 1)
                index = (runs * stride + jitter).unsqueeze(1) + torch.arange(SAMPLE_RUN)
                index = index.reshape(-1)
            index = index.to(m.device)
            if self.mode == 0:
                keys = float_bits(m[index].lerp(g[index], 1 - beta1))
            elif self.mode == 1:
                keys = float_bits(g[index])
            else:
                keys = hash_bits(index, seed)
            brackets.append(sample_bracket(keys.cpu(), float(shares[row])))
        lo, hi = zip(*brackets, strict=True) if brackets else ((), ())
        return torch.tensor(lo, dtype=torch.int64), torch.tensor(hi, dtype=torch.int64)

    def moments(self, beta1, beta2, los: Tensor, shifts: Tensor, bins: int = BINS) -> Tensor:
        counts = torch.zeros(len(self.p), bins + 1, dtype=torch.int64)
        for row, (g, m, v) in enumerate(zip(self.g, self.m, self.v, strict=True)):
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if shifts[row] >= 0:
                counts[row] = histogram(self.keys(row), int(los[row]), int(shifts[row]), bins)
        return counts

    def tie_indices(self, row: int, value: int, take: int) -> Tensor:
        return torch.nonzero(self.keys(row) == value).squeeze(1)[:take]

    def counter(self, rows: Tensor, los: Tensor, shifts: Tensor, bins: int = BINS) -> Tensor:
        return torch.stack(
            [
                histogram(self.keys(int(row)), int(lo), int(shift), bins)
                for row, lo, shift in zip(rows, los, shifts, strict=True)
            ]
        )

    def update(self, thresholds, decays, neg_step_sizes, bias2_sqrts, eps, decay_all) -> Tensor:
        moved = torch.zeros(len(self.p), dtype=torch.int64)
        for row, (p, m, v) in enumerate(zip(self.p, self.m, self.v, strict=True)):
            decay, step = float(decays[row]), float(neg_step_sizes[row])
            denom = (v.sqrt() / float(bias2_sqrts[row])).add_(eps)
            if int(thresholds[row]) == 0:  # everything moves: exactly torch.optim.AdamW
                p.mul_(decay).addcdiv_(m, denom, value=step)
                moved[row] = p.numel()
                continue
            take = (self.keys(row) >= int(thresholds[row])).view(p.shape).to(p.device)
            stepped = (p * decay).addcdiv_(m, denom, value=step)
            if decay_all:
                p.mul_(decay)
            p.copy_(torch.where(take, stepped, p))
            moved[row] = int(take.sum())
        return moved
