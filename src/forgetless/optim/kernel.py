"""The compiled MoFO CPU kernels (``mofo_kernel.c``): build once, load with ctypes, split threads.

A MoFO step is memory-bound: AdamW's fused kernel streams p, g, m, v once. Composing torch ops
would stream them ten times and allocate full-size temporaries, so the moment update, the key
histogram and the masked step are three single passes in plain C. The library is compiled with
the system C compiler on first use (under a second) into the forgetless cache; without a
compiler, or for tensors that are not contiguous float32 on CPU, MoFO uses its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from forgetless.optim.portable import SAMPLE_RUN, SAMPLE_SIZE
from forgetless.optim.select import SAMPLE_WIDTH
from forgetless.paths import cache_dir

SOURCE = Path(__file__).with_name("mofo_kernel.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]
DISABLE_ENV = "FORGETLESS_MOFO_KERNEL"  # set to 0 to force the torch path
CFLAGS_ENV = "FORGETLESS_MOFO_CFLAGS"  # extra flags, e.g. -mno-avx512f to test the plain-C loops

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failed: str | None = None
_pool: ThreadPoolExecutor | None = None

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "mofo_moments": [ctypes.c_int, _P, _P, _P, _P, ctypes.c_float, ctypes.c_float,
                     ctypes.c_float, ctypes.c_int, _P, _P, _P, ctypes.c_int, _I64, _I64, _P],
    "mofo_count": [ctypes.c_int, _P, _P, _P, ctypes.c_int, _P, _P, _P, ctypes.c_int, _I64, _I64,
                   _P],
    "mofo_update": [ctypes.c_int, _P, _P, _P, _P, _P, ctypes.c_int, _P, _P, _P, _P, _P,
                    ctypes.c_float, ctypes.c_int, _I64, _I64, _P],
    "mofo_ties": [_I64, _P, _P, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint32, _I64, _P],
    "mofo_bracket": [ctypes.c_int, ctypes.c_int, _P, _P, _P, ctypes.c_float, ctypes.c_int, _P,
                     ctypes.c_int, ctypes.c_int, _P, ctypes.c_double, _P, _P],
    "mofo_step_each": [ctypes.c_int, _P, _P, _P, _P, _P, _P, ctypes.c_float, ctypes.c_float,
                       ctypes.c_float, ctypes.c_int, _P, _P, _P, _P, _P, _P, ctypes.c_float,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_int,
                       _P, _P, _P, _P, _P],
}  # fmt: skip
# Tensors up to this many elements take the whole step one at a time (``Batch.step_each``), so
# the second sweep finds m and v still in cache (16 bytes per element: two 1M-element tensors fit
# in a 32 MiB L3). Idle 2-core Zen 4: fast step 1.39x fused AdamW vs 1.87x in batched passes
# (docs/performance.md); 0 turns it off. Both paths are bit-identical (tests/test_mofo.py).
CACHE_ELEMENTS = int(os.environ.get("FORGETLESS_MOFO_CACHE_ELEMENTS", str(1 << 20)))


def _cpu_tag() -> str:
    """The CPU flags, so a cache shared between machines never runs -march=native code elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return os.uname().machine


def _build() -> Path:
    source = SOURCE.read_bytes()
    flags = FLAGS + os.environ.get(CFLAGS_ENV, "").split()
    key = hashlib.sha256(source + " ".join(flags).encode() + _cpu_tag().encode()).hexdigest()
    target = cache_dir() / "kernels" / f"mofo-{key[:16]}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found (set CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE), "-lm"], check=True,
                       capture_output=True, text=True)  # fmt: skip
        os.replace(tmp, target)  # atomic: a half-written library is never loaded
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` (then ``why_unavailable()`` says why)."""
    global _library, _failed
    with _lock:
        if _library is None and _failed is None:
            if os.environ.get(DISABLE_ENV, "1") == "0":
                _failed = f"disabled by {DISABLE_ENV}=0"
            else:
                try:
                    lib = ctypes.CDLL(str(_build()))
                    for name, argtypes in _SIGNATURES.items():
                        getattr(lib, name).argtypes = argtypes
                        getattr(lib, name).restype = _I64 if name == "mofo_ties" else None
                    _library = lib
                except (OSError, subprocess.CalledProcessError) as err:
                    detail = getattr(err, "stderr", "") or str(err)
                    _failed = f"kernel build failed: {detail.strip().splitlines()[-1:]}"
        return _library


def why_unavailable() -> str | None:
    library()
    return _failed


def supports(tensors: list[Tensor]) -> bool:
    """Whether the kernels can run on these tensors in place."""
    return all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


def _pointers(tensors: list[Tensor]) -> Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def _ptr(tensor: Tensor) -> int:
    return tensor.data_ptr()


def _threads(total: int) -> int:
    return max(1, min(torch.get_num_threads(), total // (1 << 16)))


def _parallel(total: int, call, workers: int | None = None) -> list:
    """Run ``call(start, end, worker)`` on equal slices of [0, total): the first slice on this
    thread, the others on pool threads (ctypes releases the GIL while C runs)."""
    global _pool
    workers = max(1, workers or _threads(total))
    bounds = [total * w // workers for w in range(workers + 1)]
    if workers == 1:
        return [call(0, total, 0)]
    with _lock:
        if _pool is None or _pool._max_workers < workers - 1:
            _pool = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="mofo")
    futures = [_pool.submit(call, bounds[w], bounds[w + 1], w) for w in range(1, workers)]
    first = call(bounds[0], bounds[1], 0)
    return [first, *(f.result() for f in futures)]


class Batch:
    """Pointer arrays for one list of same-group tensors, reused by every pass of a step."""

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, mode: int, seeds: list[int]):
        self.p, self.g, self.m, self.v = params, grads, exp_avgs, exp_avg_sqs
        self.count = len(params)
        self.numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
        self.total = int(self.numels.sum())
        self.params, self.grads = _pointers(params), _pointers(grads)
        self.exp_avgs, self.exp_avg_sqs = _pointers(exp_avgs), _pointers(exp_avg_sqs)
        self.mode, self.seeds = mode, seeds
        self.seed_array = _u32(torch.tensor(seeds, dtype=torch.int64))

    def moments(self, beta1: float, beta2: float, los: Tensor, shifts: Tensor,
                bins: int) -> Tensor:  # fmt: skip
        """Update m and v; return key histograms [T, bins + 1] for rows with shift >= 0."""
        lib = library()
        los32, shifts32 = _u32(los), shifts.to(torch.int32)

        def run(start, end, _):
            counts = _zeros(self.count, bins + 1)
            lib.mofo_moments(self.count, _ptr(self.numels), _ptr(self.grads), _ptr(self.exp_avgs),
                             _ptr(self.exp_avg_sqs), 1 - beta1, beta2, 1 - beta2, self.mode,
                             _ptr(self.seed_array), _ptr(los32), _ptr(shifts32), bins, start, end,
                             _ptr(counts))  # fmt: skip
            return counts

        return _sum(_parallel(self.total, run))

    def bracket(self, rows: Tensor, beta1: float, shares: Tensor) -> tuple[Tensor, Tensor]:
        """Local first brackets (lo, hi) of the given tensors (see select.sample_bracket)."""
        index = rows.to(torch.int64)
        numels, grads, exp_avgs = self.numels[index], self.grads[index], self.exp_avgs[index]
        seeds, shares = self.seed_array[index], shares[index].to(torch.float64)
        lo = torch.empty(len(index), dtype=torch.int64)
        hi = torch.empty(len(index), dtype=torch.int64)

        def run(first, last, _):
            library().mofo_bracket(
                first, last, _ptr(numels), _ptr(grads), _ptr(exp_avgs), 1 - beta1, self.mode,
                _ptr(seeds), SAMPLE_SIZE, SAMPLE_RUN, _ptr(shares), SAMPLE_WIDTH, _ptr(lo),
                _ptr(hi),
            )  # fmt: skip

        _parallel(len(index), run, workers=min(torch.get_num_threads(), len(index)))
        return lo, hi

    def update(self, thresholds: Tensor, decays: Tensor, neg_step_sizes: Tensor,
               bias2_sqrts: Tensor, eps: float, decay_all: bool) -> Tensor:  # fmt: skip
        """Masked AdamW step; returns how many coordinates moved per tensor."""
        lib = library()
        thr = _u32(thresholds)
        decays, steps, bc2 = (t.to(torch.float32) for t in (decays, neg_step_sizes, bias2_sqrts))

        def run(start, end, _):
            moved = torch.zeros(self.count, dtype=torch.int64)
            lib.mofo_update(self.count, _ptr(self.numels), _ptr(self.params), _ptr(self.grads),
                            _ptr(self.exp_avgs), _ptr(self.exp_avg_sqs), self.mode,
                            _ptr(self.seed_array), _ptr(thr), _ptr(decays), _ptr(steps), _ptr(bc2),
                            eps, int(decay_all), start, end, _ptr(moved))  # fmt: skip
            return moved

        return _sum(_parallel(self.total, run))

    def step_each(self, ks: Tensor, tolerances: Tensor, beta1: float, beta2: float,
                  decays: Tensor, neg_step_sizes: Tensor, bias2_sqrts: Tensor, eps: float,
                  decay_all: bool, bins: int) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """The whole step for every tensor of the batch, one after the other (see
        ``mofo_step_each``), the tensors dealt to threads largest first. ``ks[t]`` 0 = not
        filtered. Returns per tensor: moved, tie value (-1: none), tie take."""
        lib = library()
        ks, tolerances = ks.to(torch.int64).contiguous(), tolerances.to(torch.int64).contiguous()
        decays, steps, bc2 = (t.to(torch.float32) for t in (decays, neg_step_sizes, bias2_sqrts))
        moved = torch.zeros(self.count, dtype=torch.int64)
        tie_values = torch.full((self.count,), -1, dtype=torch.int64)
        tie_takes = torch.zeros(self.count, dtype=torch.int64)
        workers = max(1, min(torch.get_num_threads(), self.count))
        shares: list[list[int]] = [[] for _ in range(workers)]
        loads = [0] * workers
        for row in sorted(range(self.count), key=lambda r: -int(self.numels[r])):
            least = loads.index(min(loads))
            shares[least].append(row)
            loads[least] += int(self.numels[row])

        def run(_start, _end, worker):
            which = torch.tensor(shares[worker], dtype=torch.int32)
            counts, at_least = _zeros(bins + 1), _zeros(bins + 1)
            lib.mofo_step_each(
                len(which), _ptr(which), _ptr(self.numels), _ptr(self.params), _ptr(self.grads),
                _ptr(self.exp_avgs), _ptr(self.exp_avg_sqs), 1 - beta1, beta2, 1 - beta2,
                self.mode, _ptr(self.seed_array), _ptr(ks), _ptr(tolerances), _ptr(decays),
                _ptr(steps), _ptr(bc2), eps, int(decay_all), SAMPLE_SIZE, SAMPLE_RUN,
                SAMPLE_WIDTH, bins, _ptr(counts), _ptr(at_least), _ptr(moved), _ptr(tie_values),
                _ptr(tie_takes),
            )  # fmt: skip

        _parallel(workers, run, workers=workers)
        return moved, tie_values, tie_takes

    def tie_indices(self, row: int, value: int, take: int) -> Tensor:
        """Flat indices of the first ``take`` coordinates of tensor ``row`` with key ``value``."""
        out = torch.empty(take, dtype=torch.int64)
        found = library().mofo_ties(
            self.p[row].numel(), _ptr(self.g[row]), _ptr(self.m[row]), self.mode,
            self.seeds[row], value, take, _ptr(out),
        )  # fmt: skip
        return out[:found]

    def tie_counts(self, ties: list[tuple[int, int, int]]) -> list[int]:
        """Per tie (row, value, take): how many keys of the tensor equal value, at most take."""
        return [len(self.tie_indices(row, value, take)) for row, value, take in ties]

    def counter(self, rows: Tensor, los: Tensor, shifts: Tensor, bins: int) -> Tensor:
        """Key histograms [len(rows), bins + 1] of a subset of the tensors (a refinement pass)."""
        lib = library()
        index = rows.to(torch.int64)
        numels, grads, exp_avgs = self.numels[index], self.grads[index], self.exp_avgs[index]
        seeds, los32, shifts32 = self.seed_array[index], _u32(los), shifts.to(torch.int32)
        total = int(numels.sum())

        def run(start, end, _):
            counts = _zeros(len(index), bins + 1)
            lib.mofo_count(len(index), _ptr(numels), _ptr(grads), _ptr(exp_avgs), self.mode,
                           _ptr(seeds), _ptr(los32), _ptr(shifts32), bins, start, end,
                           _ptr(counts))  # fmt: skip
            return counts

        return _sum(_parallel(total, run))


def _zeros(*shape: int) -> Tensor:
    """A count buffer from numpy: torch would fill a buffer this size with its OpenMP pool,
    whose workers then spin for milliseconds on the cores our threads are about to use."""
    return torch.from_numpy(np.zeros(shape, dtype=np.int64))


def _sum(parts: list[Tensor]) -> Tensor:
    """Sum of the threads' count buffers (numpy: no thread-pool wake-up for a small array)."""
    if len(parts) == 1:
        return parts[0]
    return torch.from_numpy(np.sum([part.numpy() for part in parts], axis=0))


def _u32(values: Tensor) -> Tensor:
    """int64 values in [0, 2**32) as the int32 tensor holding the same 32 bits."""
    values = values.to(torch.int64)
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)
