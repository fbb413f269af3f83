"""Per-tensor top-k thresholds found from counts alone, never by sorting or top-k.

Keys are non-negative float32 values compared as their bit patterns (an int in [0, 2**31) whose
order is the numeric order), so every threshold and bin edge is an exact integer and a count
"how many keys >= t" is exact. A search starts from a bracket estimated on a small sample, then
reads histograms of the keys in the bracket: ``BINS`` equal bins of ``2**shift`` bit patterns
each, plus one bin for everything above. The bin holding the k-th largest key becomes the next
bracket until the count is within tolerance; a bin of a single value is a tie, broken by index.

Sharding: every quantity the search reads is a count (bin histograms, sizes) or, for the first
bracket (which only affects speed), a sum of local estimates.
``count_reduce`` receives each count tensor computed on this process's part of the tensors and
must return the elementwise sum over all parts (e.g. an all-reduce); identity by default. All
processes then take identical decisions and find the same global threshold per tensor without
exchanging anything but these small vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

CountReduce = Callable[[Tensor], Tensor]
# count(rows, lo, shift) -> local histograms [len(rows), BINS + 1] of the given tensors' keys
CountFn = Callable[[Tensor, Tensor, Tensor], Tensor]

BINS = 1024  # bins per histogram pass: each refinement narrows the bracket 1024-fold
REFINE_SHIFT = 10  # log2(BINS)
KEY_END = 1 << 31  # every key bit pattern (including inf and NaN) is below this
SAMPLE_Z = 3.0  # bracket half-width in standard errors of the sampled quantile
SAMPLE_DESIGN_EFFECT = 2.0  # samples come in runs of neighbours: count them as half as many
SAMPLE_WIDTH = SAMPLE_Z * SAMPLE_DESIGN_EFFECT**0.5
MAX_PASSES = 8  # a bracket from anywhere reaches single values in four passes


def identity(counts: Tensor) -> Tensor:
    return counts


@dataclass
class Selection:
    """Per tensor: move keys >= ``threshold``; also the first ``tie_take`` keys equal to
    ``tie_value`` in flat index order (``tie_value`` -1 means no tie to break)."""

    threshold: Tensor
    tie_value: Tensor
    tie_take: Tensor


def ceil_log2(values: Tensor) -> Tensor:
    """Smallest s with 2**s >= value, for int64 values >= 1."""
    return torch.ceil(torch.log2(values.clamp(min=1).double())).long()


def shift_for(width: Tensor) -> Tensor:
    """Bin width exponent so that BINS bins cover ``width`` bit patterns."""
    return ceil_log2((width + BINS - 1) // BINS)


def histogram(keys: Tensor, lo: int, shift: int, bins: int = BINS) -> Tensor:
    """Reference histogram of key bit patterns (int64): the kernels' count pass in torch ops."""
    offset = keys.reshape(-1) - lo
    inside = offset[(offset >= 0) & (offset < (bins << shift))]
    counts = torch.bincount(inside >> shift, minlength=bins)
    above = (offset >= (bins << shift)).sum().reshape(1)
    return torch.cat([counts, above])


def sample_bracket(sample: Tensor, share: float, width: float = SAMPLE_WIDTH) -> tuple[int, int]:
    """Local bracket [lo, hi) of key bit patterns likely holding the k-th largest key.

    ``sample`` holds one tensor's sampled keys, ``share`` is k / numel. The bracket is the
    sampled quantile +- ``width`` standard errors (+- 2 keys); a miss only costs the search one
    more pass over that tensor. The C kernel (``mofo_bracket``) computes the same thing.
    """
    keys = torch.sort(sample, descending=True).values
    size = len(keys)
    mid = share * size
    margin = width * math.sqrt(size * share * (1 - share)) + 2
    upper, lower = math.ceil(mid - margin), math.floor(mid + margin)
    lo = 0 if lower >= size else int(keys[lower - 1])
    hi = KEY_END if upper < 1 else int(keys[upper - 1]) + 1
    return lo, hi


def agree_bracket(lo: Tensor, hi: Tensor, reduce: CountReduce = identity) -> tuple[Tensor, Tensor]:
    """(lo, shift) of the first histogram pass, identical on every shard: local brackets are
    averaged with the same sum-reduction as the counts (the bracket only affects speed)."""
    sums = reduce(torch.stack([lo, hi, torch.ones_like(lo)]).to(torch.int64))
    shards = sums[2].clamp(min=1)
    lo, hi = sums[0] // shards, -(-sums[1] // shards)
    return lo, shift_for((hi - lo).clamp(min=1))


def search(
    counts: Tensor,
    lo: Tensor,
    shift: Tensor,
    k: Tensor,
    count: CountFn,
    tolerance: Tensor,
    reduce: CountReduce = identity,
) -> Selection:
    """Thresholds moving k[i] keys of tensor i, to within ``tolerance[i]`` (0 = exactly k).

    ``counts`` are the local histograms of the first pass over brackets (lo, shift); ``count``
    runs further passes over a subset of the tensors. Ties larger than the tolerance are broken
    by flat index; everything else is decided on reduced counts only.
    """
    n_rows = len(k)
    threshold = torch.zeros(n_rows, dtype=torch.int64)
    tie_value = torch.full((n_rows,), -1, dtype=torch.int64)
    tie_take = torch.zeros(n_rows, dtype=torch.int64)
    rows = torch.arange(n_rows)
    counts = reduce(counts)
    for _ in range(MAX_PASSES):
        need, tol = k[rows], tolerance[rows]
        at_least = counts.flip(1).cumsum(1).flip(1)  # at_least[:, j]: keys >= lo + j * 2**shift
        below = at_least[:, 0] < need  # the k-th key is under the bracket
        over = at_least[:, BINS] >= need  # ... or above it
        inside = ~below & ~over
        b = ((at_least[:, :BINS] >= need.unsqueeze(1)).sum(1) - 1).clamp(min=0)
        above = at_least.gather(1, (b + 1).unsqueeze(1)).squeeze(1)
        population = counts.gather(1, b.unsqueeze(1)).squeeze(1)
        missing = need - above  # keys still to take from bin b (1..population)
        extra = population - missing  # overshoot if the whole bin b moves
        edge = lo + (b << shift)
        next_edge = lo + ((b + 1) << shift)

        take_bin = inside & (extra <= tol) & (extra <= missing)
        skip_bin = inside & ~take_bin & (missing <= tol)
        tie = inside & ~take_bin & ~skip_bin & (shift == 0)
        done = take_bin | skip_bin | tie
        threshold[rows] = torch.where(take_bin, edge, next_edge)
        tie_value[rows[tie]] = edge[tie]
        tie_take[rows[tie]] = missing[tie]

        new_lo = torch.where(below, 0, torch.where(over, next_edge.clamp(max=KEY_END), edge))
        new_shift = torch.where(
            below,
            shift_for(lo),
            torch.where(over, shift_for(KEY_END - new_lo), (shift - REFINE_SHIFT).clamp(min=0)),
        )
        keep = ~done
        if not bool(keep.any()):
            return Selection(threshold, tie_value, tie_take)
        rows, lo, shift = rows[keep], new_lo[keep], new_shift[keep]
        counts = reduce(count(rows, lo, shift))
    raise RuntimeError("MoFO threshold search did not converge (inconsistent counts?)")
