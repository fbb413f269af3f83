"""Per-tensor top-k thresholds found from counts alone, never by sorting the tensor or top-k.

Keys are non-negative float32 values compared as their bit patterns (an int in [0, 2**31) whose
order is the numeric order), so every threshold and bin edge is an exact integer and a count
"how many keys >= t" is exact. A search starts from a bracket estimated on a small sample (2048
keys per tensor, the only keys ever ordered), then reads histograms of the keys in the bracket:
``BINS`` equal bins of ``2**shift`` bit patterns each, plus one bin for everything above. The bin
holding the k-th largest key becomes the next bracket until the count is within tolerance; a bin
of a single value is a tie, broken by index.

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

import numpy as np
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


def ceil_log2(values):
    """Smallest s with 2**s >= value, for int64 values >= 1 (numpy array or tensor)."""
    if isinstance(values, Tensor):
        return torch.from_numpy(ceil_log2(values.numpy()))
    return np.ceil(np.log2(np.maximum(values, 1).astype(np.float64))).astype(np.int64)


def shift_for(width):
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
    upper, lower = bracket_ranks(size, share, width)
    lo = 0 if lower >= size else int(keys[lower - 1])
    hi = KEY_END if upper < 1 else int(keys[upper - 1]) + 1
    return lo, hi


def bracket_ranks(size: int, share: float, width: float = SAMPLE_WIDTH) -> tuple[int, int]:
    """(upper, lower): 1-based ranks, in descending order, of the sampled keys that bound the
    bracket of :func:`sample_bracket`; ``lo`` is the key of rank ``lower`` (0 when
    ``lower >= size``), ``hi`` one above the key of rank ``upper`` (``KEY_END`` when
    ``upper < 1``). Split out so the device path can pick the two keys where they were sorted
    and hand only those to the host."""
    mid = share * size
    margin = width * math.sqrt(size * share * (1 - share)) + 2
    return math.ceil(mid - margin), math.floor(mid + margin)


def agree_bracket(lo: Tensor, hi: Tensor, reduce: CountReduce = identity) -> tuple[Tensor, Tensor]:
    """(lo, shift) of the first histogram pass, identical on every shard: local brackets are
    averaged with the same sum-reduction as the counts (the bracket only affects speed)."""
    sums = reduce(torch.stack([lo, hi, torch.ones_like(lo)]).to(torch.int64)).numpy()
    shards = np.maximum(sums[2], 1)
    lo, hi = sums[0] // shards, -(-sums[1] // shards)
    return torch.from_numpy(lo), torch.from_numpy(shift_for(np.maximum(hi - lo, 1)))


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
    by flat index; everything else is decided on reduced counts only. The bookkeeping runs in
    numpy: these arrays are small, and torch would wake its thread pool for every op.
    """
    k, tolerance = k.numpy(), tolerance.numpy()
    lo, shift = lo.numpy().astype(np.int64), shift.numpy().astype(np.int64)
    n_rows = len(k)
    threshold = np.zeros(n_rows, dtype=np.int64)
    tie_value = np.full(n_rows, -1, dtype=np.int64)
    tie_take = np.zeros(n_rows, dtype=np.int64)
    rows = np.arange(n_rows)
    counts = reduce(counts).numpy()
    for _ in range(MAX_PASSES):
        need, tol = k[rows], tolerance[rows]
        at_least = counts[:, ::-1].cumsum(1)[:, ::-1]  # at_least[:, j]: keys >= lo + j * 2**shift
        below = at_least[:, 0] < need  # the k-th key is under the bracket
        over = at_least[:, BINS] >= need  # ... or above it
        inside = ~below & ~over
        b = np.maximum((at_least[:, :BINS] >= need[:, None]).sum(1) - 1, 0)
        above = np.take_along_axis(at_least, (b + 1)[:, None], 1)[:, 0]
        population = np.take_along_axis(counts, b[:, None], 1)[:, 0]
        missing = need - above  # keys still to take from bin b (1..population)
        extra = population - missing  # overshoot if the whole bin b moves
        edge = lo + (b << shift)
        next_edge = lo + ((b + 1) << shift)

        take_bin = inside & (extra <= tol) & (extra <= missing)
        skip_bin = inside & ~take_bin & (missing <= tol)
        tie = inside & ~take_bin & ~skip_bin & (shift == 0)
        done = take_bin | skip_bin | tie
        threshold[rows] = np.where(take_bin, edge, next_edge)
        tie_value[rows[tie]] = edge[tie]
        tie_take[rows[tie]] = missing[tie]

        new_lo = np.where(below, 0, np.where(over, np.minimum(next_edge, KEY_END), edge))
        new_shift = np.where(
            below,
            shift_for(lo),
            np.where(over, shift_for(KEY_END - new_lo), np.maximum(shift - REFINE_SHIFT, 0)),
        )
        keep = ~done
        if not keep.any():
            return Selection(*(torch.from_numpy(a) for a in (threshold, tie_value, tie_take)))
        rows, lo, shift = rows[keep], new_lo[keep], new_shift[keep]
        more = count(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (rows, lo, shift)))
        counts = reduce(more).numpy()
    raise RuntimeError("MoFO threshold search did not converge (inconsistent counts?)")
