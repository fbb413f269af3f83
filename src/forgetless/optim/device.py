"""MoFO's passes on an accelerator as a fixed, small number of fused kernels per tensor.

``portable.TorchBatch`` walks every tensor in 1 Mi-element pieces in Python: its dispatched
ops grow with the tensor's size (~13 per piece) and it streams each element ~6 times. Here each
pass over a tensor is one function of whole (flat) tensors, compiled with ``torch.compile``
(Inductor: Triton on CUDA/XPU, C++ on a CPU), so a pass is one or two kernels whatever the size:

1. bracket: 2048 sampled keys of the *new* momentum per tensor (one kernel), one sort per
   group; the bracket and the histogram's bin width are computed on the device;
2. moments + histogram: AdamW's m/v update, the keys and their ``BINS``-bin histogram in one
   kernel (keys outside the bracket are spread over dummy slots, so no single counter takes
   every atomic add); one copy of all the group's histograms (and brackets) to the host;
3. count rounds of ``select.search`` where the bin is still too wide (usually none in fast mode,
   one in exact mode), one kernel and one copy per round;
4. the masked step (ties by lowest index through a cumsum), with the moved count kept on the
   device.

Host synchronisations per step and group: one per pass that hands counts to the host (2 in
fast mode, 3 in exact mode typically), none per tensor. Tensors that move whole (1-D tensors
unless ``filter_1d``, ``fraction=1``) take torch's fused AdamW kernel where the device has one
(foreach ops otherwise), so ``fraction=1`` is that AdamW bit for bit.

The same functions run eagerly when compilation is off (``FORGETLESS_MOFO_COMPILE=0``, no
compiler, a simulated device in the tests); MoFO's ``backend="auto"`` then keeps the chunked
``TorchBatch``, whose temporaries stay small. Compilation is paid once per function variant
(shapes are dynamic) and said once in the log.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable

import torch
from torch import Tensor

from forgetless.optim.portable import (
    MASK32,
    SAMPLE_RUN,
    SAMPLE_SIZE,
    TorchBatch,
    mix32,
)
from forgetless.optim.select import BINS, KEY_END, bracket_ranks

ENV = "FORGETLESS_MOFO_COMPILE"  # 0: never compile (the eager functions, or TorchBatch on auto)
SPREAD = 1024  # dummy histogram slots taking the keys outside the bracket (atomic contention)
FUSED_DEVICES = ("cuda", "xpu", "mps", "hpu")  # where torch.optim.AdamW has a fused kernel

log = logging.getLogger("forgetless")
_said: set[str] = set()


def say_once(message: str) -> None:
    """Log ``message`` the first time only (compile times, why compilation is off)."""
    if message not in _said:
        _said.add(message)
        log.info(message)


# -- the per-tensor passes (pure torch ops on flat tensors) ------------------------------------


def _bits(values: Tensor) -> Tensor:
    """|values| as float32 bit patterns, int64 (as ``portable.float_bits``)."""
    return values.float().abs().view(torch.int32).to(torch.int64)


def _keys(mode: int, g: Tensor, m: Tensor, seed) -> Tensor:
    """The ranking keys of a flat tensor: 0 |m|, 1 |g|, 2 a seeded hash of the index."""
    if mode == 0:
        return _bits(m)
    if mode == 1:
        return _bits(g)
    index = torch.arange(m.numel(), device=m.device, dtype=torch.int64)
    key = (mix32((index + seed) & MASK32) >> 8).float() * (1.0 / 16777216.0)
    return _bits(key)


def sample_keys(g: Tensor, m: Tensor, w1: float, seed: int, mode: int) -> Tensor:
    """``SAMPLE_SIZE`` keys of the new momentum (or gradient, or hash) at the indices the C
    kernel samples (``portable.sample_index``); the tensor has more than ``SAMPLE_SIZE``."""
    numel = m.numel()
    runs = torch.arange(SAMPLE_SIZE // SAMPLE_RUN, device=m.device, dtype=torch.int64)
    stride = numel // (SAMPLE_SIZE // SAMPLE_RUN)
    jitter = mix32(runs ^ seed) % (stride - SAMPLE_RUN + 1)
    offsets = torch.arange(SAMPLE_RUN, device=m.device, dtype=torch.int64)
    index = ((runs * stride + jitter).unsqueeze(1) + offsets).reshape(-1)
    if mode == 0:
        return _bits(m[index].lerp(g[index], w1))
    if mode == 1:
        return _bits(g[index])
    key = (mix32((index + seed) & MASK32) >> 8).float() * (1.0 / 16777216.0)
    return _bits(key)


def _histogram(keys: Tensor, lo, shift, bins: int) -> Tensor:
    """Raw counters [bins + 2 * SPREAD]: keys in each bin of width 2**shift from ``lo``, then
    the dummy slots of keys below and above the bins (``histograms`` reduces a stack of them).

    One scatter of ones: a key in the bracket adds to its bin; a key below or above it adds to
    one of ``SPREAD`` dummy slots of its side (by index), so the atomic adds of the ~90 % of
    keys outside the bracket never queue on one counter. Summing the "above" slots after the
    pass keeps it one loop (a separate reduction would read the keys again)."""
    offset = keys - lo
    bin_ = offset >> shift  # arithmetic shift: floor, so keys below lo get negative bins
    spread = torch.arange(keys.numel(), device=keys.device) & (SPREAD - 1)
    slot = torch.where(bin_ < 0, bins + spread, torch.where(bin_ >= bins, bins + SPREAD + spread,
                                                            bin_))  # fmt: skip
    # int32 counters (half the scatter traffic) hold any count below 2**31 elements
    kind = torch.int32 if keys.numel() < 2**31 else torch.int64
    counts = torch.zeros(bins + 2 * SPREAD, dtype=kind, device=keys.device)
    ones = torch.ones((), dtype=kind, device=keys.device).expand(keys.numel())
    return counts.index_put_((slot,), ones, accumulate=True)


def histograms(raw: list[Tensor], bins: int) -> Tensor:
    """[len(raw), bins + 1] int64 from ``_histogram``'s counters: the bins, then the count
    above them (a few ops for a whole group)."""
    stacked = torch.stack([r.to(torch.int64) for r in raw]) if len({r.dtype for r in raw}) > 1 \
        else torch.stack(raw).to(torch.int64)
    return torch.cat([stacked[:, :bins], stacked[:, bins + SPREAD :].sum(1, keepdim=True)], 1)


def moments_histogram(g: Tensor, m: Tensor, v: Tensor, w1: float, beta2: float, w2: float,
                      lo: Tensor, shift: Tensor, seed: int, mode: int,
                      bins: int) -> Tensor:  # fmt: skip
    """AdamW's moment update op for op (in place), then the keys' histogram (``_histogram``)."""
    m.lerp_(g, w1)
    v.mul_(beta2).addcmul_(g, g, value=w2)
    return _histogram(_keys(mode, g, m, seed), lo, shift, bins)


def count_keys(g: Tensor, m: Tensor, lo: Tensor, shift: Tensor, seed: int, mode: int,
               bins: int) -> Tensor:  # fmt: skip
    """A refinement round: the histogram alone."""
    return _histogram(_keys(mode, g, m, seed), lo, shift, bins)


def masked_step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, threshold: int, tie_value: int,
                tie_take: int, decay: float, step: float, bias2_sqrt: float, eps: float,
                seed: int, mode: int, decay_all: bool, ties: bool,
                count: bool) -> Tensor | None:  # fmt: skip
    """AdamW's step where key >= threshold (and, with ``ties``, the first ``tie_take`` keys
    equal to ``tie_value`` in flat order); the arithmetic of ``TorchBatch._masked_step``.
    Returns the moved count (0-d, on the device) if ``count`` (an extra read of the keys)."""
    keys = _keys(mode, g, m, seed)
    take = keys >= threshold
    if ties:
        tied = keys == tie_value
        take = take | (tied & (torch.cumsum(tied.to(torch.int64), 0) <= tie_take))
    denom = v.sqrt().div(bias2_sqrt).add(eps)
    stepped = p * decay + step * m / denom
    if decay_all:
        p.mul_(decay)
    p.copy_(torch.where(take, stepped, p))
    return take.sum() if count else None


# -- compilation --------------------------------------------------------------------------------


def compile_off_reason(device: torch.device) -> str | None:
    """Why the passes would run eagerly on ``device`` (``None``: they are compiled)."""
    if os.environ.get(ENV, "1") == "0":
        return f"disabled by {ENV}=0"
    if device.type == "meta":
        return "a simulated device (meta tensors cannot run compiled kernels)"
    if device.type in ("cuda", "xpu"):
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed"
    return None


_compile_seconds: dict[str, float] = {}  # function -> seconds spent compiling it (tests, bench)
_broken: list[str] = []  # why compilation failed in this process (then: eager from then on)


# Passes holding a histogram scatter. On a CPU, Inductor parallelises a scatter with atomic adds
# that the cores contend for: a 16 Mi-element moments + histogram pass took 46 ms on 2 threads and
# 22 ms on 1, where the loop is plain adds (docs/performance.md). One thread for these passes on
# a CPU only; Triton kernels (GPU) ignore the C++ options.
SCATTER_PASSES = (moments_histogram, count_keys)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # dynamic: one graph for every tensor size; emulate_precision_casts: bf16/fp16 ops round
    # between ops as eager AdamW does (else Inductor keeps fp32 intermediates); C++ kernels
    # named in the profiler (as GPU kernels are), so a CPU test can count launches
    options = {"emulate_precision_casts": True, "cpp.enable_kernel_profile": True}
    if fn in SCATTER_PASSES:
        options["cpp.threads"] = 1
    return torch.compile(fn, dynamic=True, fullgraph=True, options=options)


METER: list[tuple[str, int, int]] | None = None  # set to a list: (function, elements, itemsize)


def run(fn: Callable, compiled: bool, *args, **kwargs):
    """``fn`` compiled (its first compile timed and logged once) or eagerly."""
    if METER is not None:  # what the bench and tests count: elements through each function
        METER.append((fn.__name__, args[0].numel(), args[0].element_size()))
    if not compiled or _broken:
        return fn(*args, **kwargs)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    try:
        out = _compiled(fn)(*args, **kwargs)
    except Exception as err:  # a compiler missing or failing: the same function, eagerly
        _broken.append(f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        say_once(f"MoFO: torch.compile failed ({_broken[0]}); device passes run eagerly")
        return fn(*args, **kwargs)
    if counters["stats"]["unique_graphs"] > graphs:
        seconds = time.perf_counter() - start
        _compile_seconds[fn.__name__] = _compile_seconds.get(fn.__name__, 0.0) + seconds
        log.info("MoFO: compiled %s for %s in %.1f s (once per variant; shapes are dynamic)",
                 fn.__name__, args[0].device.type, seconds)
    return out


# -- the batch ----------------------------------------------------------------------------------


class FusedBatch(TorchBatch):
    """``TorchBatch``'s interface with whole-tensor passes; see the module docstring.

    Adds :meth:`device_bracket` and :meth:`moments_device`, which keep the bracket on the device
    (``MoFO`` uses them when it can), and ``moved`` counts returned as device tensors."""

    moves_ties = True
    device_passes = True

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, mode: int, seeds: list[int],
                 compiled: bool = True):  # fmt: skip
        super().__init__(params, grads, exp_avgs, exp_avg_sqs, mode, seeds)
        self.compiled = compiled
        flat = _alias if compiled else _flat_view
        self.flat = [[flat(t) for t in ts] for ts in zip(params, grads, exp_avgs, exp_avg_sqs,
                                                         strict=True)]  # fmt: skip
        self.deferred: list[int] = []  # whole-moving rows whose moments the AdamW step updates
        self.adamw: dict = {}  # lr, beta1, beta2, weight_decay, steps (set by MoFO)

    @staticmethod
    def supports(tensors: list[Tensor]) -> bool:
        return all(t.is_contiguous() and t.is_floating_point() for t in tensors)

    def _run(self, fn, *args, **kwargs):
        return run(fn, self.compiled, *args, **kwargs)

    # -- pass 1: brackets on the device --------------------------------------------------------

    def device_bracket(self, rows: list[int], beta1: float, shares: list[float],
                       reduce) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(lo, shift) per row as device int64 tensors, as ``select.agree_bracket`` gives on
        the host from ``bracket``'s (lo, hi); ``reduce`` sums them over shards."""
        device = self.p[rows[0]].device
        samples = torch.full((len(rows), SAMPLE_SIZE), -1, dtype=torch.int64, device=device)
        for i, row in enumerate(rows):
            p, g, m, _v = self.flat[row]
            if m.numel() > SAMPLE_SIZE:
                keys = self._run(sample_keys, g, m, 1 - beta1, self.seeds[row], self.mode)
            elif self.mode == 0:
                keys = _bits(m.lerp(g, 1 - beta1))
            else:
                keys = _keys(self.mode, g, m, self.seeds[row])
            samples[i, : len(keys)].copy_(keys)
        ordered = samples.sort(dim=1, descending=True).values  # padding (-1) goes last
        zero = torch.zeros((), dtype=torch.int64, device=device)
        end = torch.full((), KEY_END - 1, dtype=torch.int64, device=device)
        lows, highs = [], []
        for i, row in enumerate(rows):
            size = min(self.m[row].numel(), SAMPLE_SIZE)
            upper, lower = bracket_ranks(size, shares[i])
            lows.append(zero if lower >= size else ordered[i, min(max(lower, 1), size) - 1])
            highs.append(end if upper < 1 else ordered[i, min(max(upper, 1), size) - 1])
        lo, hi = torch.stack(lows), torch.stack(highs) + 1
        sums = reduce(torch.stack([lo, hi, torch.ones_like(lo)]))
        shards = sums[2].clamp(min=1)
        lo = torch.div(sums[0], shards, rounding_mode="floor")
        hi = -torch.div(-sums[1], shards, rounding_mode="floor")
        return lo, _shift_for(torch.clamp(hi - lo, min=1))

    # -- pass 2: moments + histograms ----------------------------------------------------------

    def moments_device(self, beta1: float, beta2: float, rows: list[int], lo, shift,
                       bins: int = BINS) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Moments of every row; histograms of ``rows`` with the device brackets (lo, shift).
        One host copy: (counts [len(rows), bins + 1], lo, shift) as host tensors."""
        self._whole_moments(beta1, beta2, set(rows))
        if not rows:
            return (torch.zeros(0, bins + 1, dtype=torch.int64),) * 3
        hists = [self._run(moments_histogram, g, m, v, 1 - beta1, beta2, 1 - beta2, lo[i],
                           shift[i], self.seeds[row], self.mode, bins)
                 for i, row in enumerate(rows)
                 for _p, g, m, v in (self.flat[row],)]  # fmt: skip
        packed = torch.cat([histograms(hists, bins), lo.unsqueeze(1), shift.unsqueeze(1)],
                           1).cpu()  # fmt: skip
        return packed[:, : bins + 1], packed[:, bins + 1], packed[:, bins + 2]

    def moments(self, beta1, beta2, los: Tensor, shifts: Tensor, bins: int = BINS) -> Tensor:
        """``TorchBatch.moments`` with host brackets (sharded groups, the kernel's order)."""
        rows = [row for row in range(len(self.p)) if int(shifts[row]) >= 0]
        self._whole_moments(beta1, beta2, set(rows))
        counts = torch.zeros(len(self.p), bins + 1, dtype=torch.int64)
        if rows:
            hists = [self._run(moments_histogram, g, m, v, 1 - beta1, beta2, 1 - beta2,
                               int(los[row]), int(shifts[row]), self.seeds[row], self.mode, bins)
                     for row in rows for _p, g, m, v in (self.flat[row],)]  # fmt: skip
            counts[rows] = histograms(hists, bins).cpu()
        return counts

    def _whole_moments(self, beta1: float, beta2: float, filtered: set[int]) -> None:
        """Rows that move whole: their moments are left to the fused AdamW step where the
        device has one, else updated here as foreach AdamW does."""
        whole = [row for row in range(len(self.p)) if row not in filtered]
        fused = [row for row in whole if self.p[row].device.type in FUSED_DEVICES]
        self.deferred = fused
        rest = [row for row in whole if row not in fused]
        if rest:
            m, g, v = ([xs[row] for row in rest] for xs in (self.m, self.g, self.v))
            torch._foreach_lerp_(m, g, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, g, g, value=1 - beta2)

    # -- pass 3: count rounds ------------------------------------------------------------------

    def counter(self, rows: Tensor, los: Tensor, shifts: Tensor, bins: int = BINS) -> Tensor:
        hists = [self._run(count_keys, g, m, int(lo), int(shift), self.seeds[row], self.mode,
                           bins)
                 for row, lo, shift in zip(rows.tolist(), los.tolist(), shifts.tolist(),
                                           strict=True)
                 for _p, g, m, _v in (self.flat[row],)]  # fmt: skip
        return histograms(hists, bins).cpu()

    # -- pass 4: the step ----------------------------------------------------------------------

    def update(self, thresholds, decays, neg_step_sizes, bias2_sqrts, eps, decay_all,
               ties=(), count: bool = True) -> Tensor:  # fmt: skip
        """The masked step of every filtered row, AdamW on the others. Returns the moved
        counts per tensor as a device tensor (no host copy), or ``None`` without ``count``.
        Rows left to fused AdamW need ``self.adamw`` (lr, beta1, beta2, weight_decay, steps)."""
        tie_of = {row: (value, take) for row, value, take in ties if take > 0}
        moved: list[Tensor | None] = []
        device = self.p[0].device
        deferred = set(self.deferred)
        plain = [row for row in range(len(self.p))
                 if int(thresholds[row]) == 0 and row not in deferred]  # fmt: skip
        if deferred:
            self._fused_adamw(sorted(deferred), eps, **self.adamw)
        if plain:
            self._foreach_adamw(plain, decays, neg_step_sizes, bias2_sqrts, eps)
        for row in range(len(self.p)):
            if row in deferred or int(thresholds[row]) == 0:
                if count:
                    moved.append(torch.full((), self.p[row].numel(), dtype=torch.int64,
                                            device=device))  # fmt: skip
                continue
            p, g, m, v = self.flat[row]
            tie = tie_of.get(row)
            tie_value, tie_take = tie if tie else (-1, 0)
            moved.append(self._run(masked_step, p, g, m, v, min(int(thresholds[row]), KEY_END),
                                   tie_value, tie_take, float(decays[row]),
                                   float(neg_step_sizes[row]), float(bias2_sqrts[row]), eps,
                                   self.seeds[row], self.mode, bool(decay_all),
                                   tie is not None, count))  # fmt: skip
        return torch.stack([t.to(device) for t in moved]) if count else None

    def _foreach_adamw(self, rows, decays, neg_step_sizes, bias2_sqrts, eps) -> None:
        """``torch.optim.AdamW(foreach=True)``'s step, op for op (moments already updated)."""
        p, m, v = ([xs[row] for row in rows] for xs in (self.p, self.m, self.v))
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [float(bias2_sqrts[row]) for row in rows])
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(p, [float(decays[row]) for row in rows])
        torch._foreach_addcdiv_(p, m, denom, [float(neg_step_sizes[row]) for row in rows])

    def _fused_adamw(self, rows, eps, lr, beta1, beta2, weight_decay, steps) -> None:
        """torch's fused AdamW kernel on whole-moving rows: one launch for them all."""
        p, g, m, v = ([xs[row] for row in rows] for xs in (self.p, self.g, self.m, self.v))
        # the kernel reads step counts from device tensors: one small host-to-device copy
        counts = torch.tensor([steps[row] for row in rows], dtype=torch.float32)
        device_steps = list(counts.to(p[0].device, non_blocking=True).unbind())
        torch._fused_adamw_(p, g, m, v, [], device_steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
                            grad_scale=None, found_inf=None)  # fmt: skip


def _flat_view(tensor: Tensor) -> Tensor:
    return tensor.detach().view(-1)


def _alias(tensor: Tensor) -> Tensor:
    """A flat tensor on the same memory that is not a view: compiled code guards on a view's
    base, so views of 2-D and 3-D tensors would each compile their own graph."""
    tensor = tensor.detach()
    out = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return out.set_(tensor.untyped_storage(), tensor.storage_offset(), (tensor.numel(),), (1,))


def _shift_for(width: Tensor) -> Tensor:
    """``select.shift_for`` on device int64 tensors, exactly: ceil(log2(ceil(width / BINS)))."""
    bins_needed = torch.div(width + BINS - 1, BINS, rounding_mode="floor")
    # ceil(log2(x)) for integer x >= 1 is the bit length of x - 1: frexp's exponent, exact
    exponent = torch.frexp((bins_needed - 1).to(torch.float64)).exponent.to(torch.int64)
    return torch.where(bins_needed <= 1, torch.zeros_like(exponent), exponent)


__all__ = ["ENV", "FusedBatch", "compile_off_reason", "count_keys", "masked_step",
           "moments_histogram", "run", "sample_keys", "say_once"]  # fmt: skip
