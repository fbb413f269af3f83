"""The MoFO passes in plain torch ops, run where the parameters live (CUDA, bf16/fp16, any device).

Same interface, selection and arithmetic as ``kernel.Batch`` (one object per parameter group
and step), and the tests' mirror of the kernels. Every CUDA or half-precision user runs this
path, so it is written not to drag tensors to the host:

- keys, bin indices and masks exist one chunk (``CHUNK`` elements) at a time, never as a
  full-size copy of a tensor; the dense masked step of one tensor is chunked the same way;
- histograms are ``index_add_`` into a device count matrix with explicit bins (slot 0 below the
  bracket, then ``bins`` bins, then one slot above it): ``torch.bincount`` and ``torch.histc``
  without a range read a min/max back to the host, a synchronisation per call;
- each pass (bracket, moments + histograms, each refinement, masked step) ends with one
  ``.cpu()`` of a small result stacked over the batch's tensors (brackets, count vectors, moved
  counts): host synchronisations per step are a small constant per group and device, and the
  elements that cross are O(tensors x bins), not O(parameters);
- per-tensor scalars (bracket, threshold, step size) enter the ops as Python numbers, so no
  host-to-device copy (also a synchronisation when blocking) is needed either;
- ties at the threshold are taken lowest flat index first on the device: a running cumsum of
  the tie mask, carried across chunks as a device scalar.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from forgetless.optim.select import BINS, KEY_END, bracket_ranks, histogram, sample_bracket

SAMPLE_SIZE = 2048  # keys sampled per tensor to bracket its threshold
SAMPLE_RUN = 8  # ... read in runs of 8 neighbours (one cache line)
CHUNK = 1 << 20  # elements per piece of a pass: bounds every full-size temporary

MASK32 = 0xFFFF_FFFF

__all__ = ["TorchBatch", "float_bits", "hash_bits", "histogram", "key_bits", "mix32",
           "sample_bracket"]  # fmt: skip

Tie = tuple[int, int, int]  # (row, tie value, how many tied coordinates to move)


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


def bits32(values: Tensor) -> Tensor:
    """:func:`float_bits` as int32 (every key is below 2**31): half the bytes of a chunk.
    One pass for float32: the bit pattern with its sign bit cleared (what ``abs`` gives)."""
    flat = values.detach().reshape(-1)
    if flat.dtype == torch.float32:
        return flat.view(torch.int32) & 0x7FFF_FFFF
    return flat.float().abs_().view(torch.int32)


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


def sample_index(numel: int, seed: int, device: torch.device) -> Tensor:
    """Flat indices of a tensor's sampled keys (as ``mofo_bracket``), computed on ``device``."""
    if numel <= SAMPLE_SIZE:
        return torch.arange(numel, device=device)
    runs = torch.arange(SAMPLE_SIZE // SAMPLE_RUN, device=device)
    stride = numel // len(runs)
    jitter = mix32(runs ^ seed) % (stride - SAMPLE_RUN + 1)
    index = (runs * stride + jitter).unsqueeze(1) + torch.arange(SAMPLE_RUN, device=device)
    return index.reshape(-1)


def _to_host(parts: dict[torch.device, Tensor]) -> dict[torch.device, Tensor]:
    """One device-to-host copy per device: the synchronisation point of a pass."""
    return {device: part.cpu() for device, part in parts.items()}


class TorchBatch:
    """``kernel.Batch`` in torch ops, on the tensors' own device(s). See the module docstring."""

    moves_ties = True  # ``update`` takes the ties too (the kernel path moves them afterwards)

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, mode: int, seeds: list[int]):
        self.p, self.g, self.m, self.v = params, grads, exp_avgs, exp_avg_sqs
        self.mode, self.seeds = mode, seeds

    # -- pieces and keys ------------------------------------------------------------------------

    def _pieces(self, row: int) -> Iterator[tuple[int, int, Tensor, Tensor, Tensor, Tensor]]:
        """(start, end, p, g, m, v) pieces of tensor ``row`` in flat order, ``CHUNK`` elements
        each; a non-contiguous tensor is one piece in its own shape (no flat view of it)."""
        tensors = (self.p[row], self.g[row], self.m[row], self.v[row])
        numel = tensors[0].numel()
        if not all(t.is_contiguous() for t in tensors):
            yield (0, numel, *tensors)
            return
        flat = [t.view(-1) for t in tensors]
        for start in range(0, numel, CHUNK):
            end = min(numel, start + CHUNK)
            yield (start, end, *(t[start:end] for t in flat))

    def _keys(self, row: int, start: int, end: int, g: Tensor, m: Tensor) -> Tensor:
        """int32 key bit patterns of one piece, flat."""
        if self.mode == 0:
            return bits32(m)
        if self.mode == 1:
            return bits32(g)
        index = torch.arange(start, end, device=m.device)
        return hash_bits(index, self.seeds[row]).to(torch.int32)

    def _histogram(self, row: int, lo: int, shift: int, bins: int, out: Tensor) -> None:
        """Add the keys of tensor ``row`` to ``out`` ([bins + 2] on the device): slot 0 below
        ``lo``, slot 1 + b for bin b of width 2**shift, slot bins + 1 above the bins."""
        if lo >= KEY_END:  # every key is below the bracket: nothing to count
            return
        one = torch.ones(1, dtype=out.dtype, device=out.device)
        width = 1 << shift
        for start, end, _p, g, m, _v in self._pieces(row):
            slot = self._keys(row, start, end, g, m)
            if lo >= width:  # (key - lo + width) >> shift == ((key - lo) >> shift) + 1, no overflow
                slot.sub_(lo - width).bitwise_right_shift_(shift).clamp_(0, bins + 1)
            else:
                slot.sub_(lo).bitwise_right_shift_(shift).clamp_(-1, bins).add_(1)
            out.index_add_(0, slot, one.expand(len(slot)))

    def _by_device(self, rows: list[int]) -> dict[torch.device, list[int]]:
        out: dict[torch.device, list[int]] = {}
        for row in rows:
            out.setdefault(self.p[row].device, []).append(row)
        return out

    def _histograms(self, rows: list[int], los: list[int], shifts: list[int],
                    bins: int) -> Tensor:  # fmt: skip
        """Histograms [len(rows), bins + 1] (bins, then above) on the host, one copy per device."""
        out = torch.zeros(len(rows), bins + 1, dtype=torch.int64)
        position = {row: i for i, row in enumerate(rows)}
        parts, order = {}, {}
        for device, which in self._by_device(rows).items():
            counts = torch.zeros(len(which), bins + 2, dtype=torch.int64, device=device)
            for i, row in enumerate(which):
                j = position[row]
                self._histogram(row, los[j], shifts[j], bins, counts[i])
            parts[device], order[device] = counts, which
        for device, counts in _to_host(parts).items():
            index = torch.tensor([position[row] for row in order[device]], dtype=torch.int64)
            out[index] = counts[:, 1:]
        return out

    # -- the passes -----------------------------------------------------------------------------

    def bracket(self, rows: Tensor, beta1: float, shares: Tensor) -> tuple[Tensor, Tensor]:
        """Local first brackets (lo, hi) of the given tensors, from sampled keys.

        The samples are sorted on the device, in one padded matrix per device; only the two
        keys bounding each bracket (``select.bracket_ranks``) are copied to the host."""
        rows_list = rows.tolist()
        lo = torch.zeros(len(rows_list), dtype=torch.int64)
        hi = torch.full((len(rows_list),), KEY_END, dtype=torch.int64)
        position = {row: i for i, row in enumerate(rows_list)}
        parts, order = {}, {}
        ranks = {}  # row -> (sample size, upper rank, lower rank)
        for device, which in self._by_device(rows_list).items():
            samples = torch.full((len(which), SAMPLE_SIZE), -1, dtype=torch.int64, device=device)
            for i, row in enumerate(which):
                m, g = self.m[row].reshape(-1), self.g[row].reshape(-1)
                index = sample_index(m.numel(), self.seeds[row], device)
                if self.mode == 0:
                    keys = float_bits(m[index].lerp(g[index], 1 - beta1))
                elif self.mode == 1:
                    keys = float_bits(g[index])
                else:
                    keys = hash_bits(index, self.seeds[row])
                samples[i, : len(keys)] = keys
            ordered = samples.sort(dim=1, descending=True).values  # padding (-1) goes last
            picks = []
            for i, row in enumerate(which):
                size = min(self.m[row].numel(), SAMPLE_SIZE)
                upper, lower = bracket_ranks(size, float(shares[row]))
                ranks[row] = (size, upper, lower)
                picks.append(ordered[i, min(max(lower, 1), size) - 1])
                picks.append(ordered[i, min(max(upper, 1), size) - 1])
            parts[device], order[device] = torch.stack(picks).view(-1, 2), which
        for device, picked in _to_host(parts).items():
            for (lower_key, upper_key), row in zip(picked.tolist(), order[device], strict=True):
                size, upper, lower = ranks[row]
                i = position[row]
                lo[i] = 0 if lower >= size else lower_key
                hi[i] = KEY_END if upper < 1 else upper_key + 1
        return lo, hi

    def moments(self, beta1, beta2, los: Tensor, shifts: Tensor, bins: int = BINS) -> Tensor:
        """AdamW's moment update, then the histograms [T, bins + 1] of the rows with
        ``shifts >= 0`` (zeros elsewhere).

        The moments follow ``torch.optim.AdamW``'s default on each device: foreach ops off the
        CPU (one launch per op for the group), single-tensor ops on the CPU, where AdamW does
        not default to foreach and where ``_foreach_mul_`` rounds float16 differently."""
        on_cpu = [row for row, m in enumerate(self.m) if m.device.type == "cpu"]
        for row in on_cpu:
            self.m[row].lerp_(self.g[row], 1 - beta1)
            self.v[row].mul_(beta2).addcmul_(self.g[row], self.g[row], value=1 - beta2)
        others = [row for row, m in enumerate(self.m) if m.device.type != "cpu"]
        if others:
            m, g, v = ([xs[row] for row in others] for xs in (self.m, self.g, self.v))
            torch._foreach_lerp_(m, g, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        counts = torch.zeros(len(self.p), bins + 1, dtype=torch.int64)
        rows = [row for row in range(len(self.p)) if int(shifts[row]) >= 0]
        if rows:
            counts[rows] = self._histograms(rows, [int(los[r]) for r in rows],
                                            [int(shifts[r]) for r in rows], bins)  # fmt: skip
        return counts

    def counter(self, rows: Tensor, los: Tensor, shifts: Tensor, bins: int = BINS) -> Tensor:
        """Key histograms [len(rows), bins + 1] of a subset of the tensors (a refinement pass)."""
        return self._histograms(rows.tolist(), los.tolist(), shifts.tolist(), bins)

    def tie_counts(self, ties: list[Tie]) -> list[int]:
        """Per tie: how many of this tensor's keys equal the tie value, at most ``take``."""
        parts: dict[torch.device, list[Tensor]] = {}
        order: dict[torch.device, list[int]] = {}
        for i, (row, value, _take) in enumerate(ties):
            device = self.p[row].device
            total = torch.zeros((), dtype=torch.int64, device=device)
            for start, end, _p, g, m, _v in self._pieces(row):
                total += (self._keys(row, start, end, g, m) == value).sum()
            parts.setdefault(device, []).append(total)
            order.setdefault(device, []).append(i)
        out = [0] * len(ties)
        stacked = {device: torch.stack(found) for device, found in parts.items()}
        for device, found in _to_host(stacked).items():
            for i, count in zip(order[device], found.tolist(), strict=True):
                out[i] = min(count, ties[i][2])
        return out

    def update(self, thresholds, decays, neg_step_sizes, bias2_sqrts, eps, decay_all,
               ties: list[Tie] = (), count: bool = True) -> Tensor:  # fmt: skip
        """Masked AdamW step: keys >= threshold move, and per tie (row, value, take) the first
        ``take`` keys equal to ``value`` in flat order. Returns moved counts per tensor
        (``count=False``: the masked tensors' counts are skipped, a pass and a copy saved)."""
        tie_of = {row: (value, take) for row, value, take in ties if take > 0}
        moved = torch.zeros(len(self.p), dtype=torch.int64)
        masked = []
        for row, (p, m, v) in enumerate(zip(self.p, self.m, self.v, strict=True)):
            decay, step = float(decays[row]), float(neg_step_sizes[row])
            if int(thresholds[row]) == 0:  # everything moves: exactly torch.optim.AdamW
                denom = (v.sqrt() / float(bias2_sqrts[row])).add_(eps)
                p.mul_(decay).addcdiv_(m, denom, value=step)
                moved[row] = p.numel()
            else:
                masked.append(row)
        parts, order = {}, {}
        for device, which in self._by_device(masked).items():
            counts = torch.zeros(len(which), dtype=torch.int64, device=device)
            for i, row in enumerate(which):
                self._masked_step(row, int(thresholds[row]), tie_of.get(row), float(decays[row]),
                                  float(neg_step_sizes[row]), float(bias2_sqrts[row]), eps,
                                  decay_all, counts[i] if count else None)  # fmt: skip
            parts[device], order[device] = counts, which
        if count:
            for device, counts in _to_host(parts).items():
                moved[order[device]] = counts
        return moved

    def _masked_step(self, row: int, threshold: int, tie: tuple[int, int] | None, decay: float,
                     step: float, bias2_sqrt: float, eps: float, decay_all: bool,
                     moved: Tensor | None) -> None:  # fmt: skip
        """The masked step of one tensor, piece by piece; adds the moved count to ``moved``."""
        seen = torch.zeros((), dtype=torch.int64, device=self.p[row].device)  # earlier tie keys
        for start, end, p, g, m, v in self._pieces(row):
            keys = self._keys(row, start, end, g, m)
            take = keys > min(threshold, KEY_END) - 1  # keys >= threshold, in int32's range
            if tie is not None:
                value, tie_take = tie
                tied = keys == value
                running = tied.cumsum(0).add_(seen)  # tie keys up to here, this one included
                take |= tied & (running <= tie_take)
                seen = running[-1]
            take = take.view(p.shape)
            denom = v.sqrt().div_(bias2_sqrt).add_(eps)
            stepped = (p * decay).addcdiv_(m, denom, value=step)
            if decay_all:
                p.mul_(decay)
            torch.where(take, stepped, p, out=p)
            if moved is not None:
                moved += take.sum()
