"""MoFO: AdamW that moves only the coordinates with the largest momentum (Chen et al., 2024).

The dense Adam moments are updated exactly as AdamW updates them; the difference is which
coordinates of each parameter tensor take the step. Keeping most weights at their pre-trained
values each step is what limits forgetting, at no extra state compared with AdamW.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from forgetless.optim import device, kernel, select
from forgetless.optim.device import FusedBatch
from forgetless.optim.portable import TorchBatch
from forgetless.optim.select import CountReduce

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
FILTERS = ("momentum", "gradient", "random")
TOLERANCE = 0.002  # fast mode: moved count within 0.2 % of k (bin granularity), else refine


class MoFO(torch.optim.Optimizer):
    """AdamW whose step, in every tensor with two or more dims, touches only the top ``fraction``.

    Args:
        params: tensors or param groups, as for ``torch.optim.AdamW``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        fraction: share of each filtered tensor's coordinates that move per step, in (0, 1];
            ``k = max(1, round(fraction * numel))``. ``1.0`` is AdamW: bitwise with
            ``backend="torch"``, within float32 rounding (an ulp or two) with the kernel.
        filter: how coordinates are ranked: ``"momentum"`` (|first moment|, the paper's MoFO),
            ``"gradient"`` (|current gradient|) or ``"random"`` (uniform, a seeded ablation).
        decay_frozen: ``False`` (default) applies weight decay only to the coordinates that move,
            so frozen weights stay exactly at their values. ``True`` decays every coordinate, the
            behaviour of the authors' reference code.
        filter_1d: also filter 1-D tensors (norm weights, biases); by default they take a plain
            AdamW step, as in the paper.
        exact: select exactly the top-k set (ties broken by lowest flat index) instead of the
            fast threshold whose count may differ from k by a small documented tolerance.
        seed: seed of the ``"random"`` filter; the mask of step t is a function of (seed, t).
        track_masks: store the number of coordinates that moved at the last step as
            ``state[p]["moved"]`` (an int64 scalar tensor) for every parameter.
        count_reduce: for tensors sharded over processes: sums a count tensor over all shards
            (e.g. ``dist.all_reduce``); every process must then hold its shard of the same
            tensors in the same order. See ``forgetless.optim.select``. Identity by default.
            Here ties at the threshold are broken by index within each shard;
            ``forgetless.optim.distributed.ShardedMoFO`` ranks them across shards.
        backend: ``"auto"`` (the compiled kernel, ``forgetless.optim.kernel``, for groups of
            contiguous float32 CPU tensors; on an accelerator the fused device passes of
            ``forgetless.optim.device``, compiled with ``torch.compile``, where they compile;
            chunked torch ops otherwise, e.g. bf16 on a CPU), ``"kernel"`` (error if
            unavailable), ``"fused"`` (the fused passes, compiled unless
            ``FORGETLESS_MOFO_COMPILE=0``) or ``"torch"`` (chunked torch ops). All compute the
            same selection and follow AdamW's arithmetic op by op.

    How the top-k set is found: from counts only (``forgetless.optim.select``): a sampled
    bracket, then exact histograms of the keys inside it, fused into the pass that updates the
    moments. Fast mode stops when the count is within 0.2 % of k (``TOLERANCE``; measured
    within 0.1 % on real momenta), so boundary coordinates may differ from the exact top-k set;
    ``exact`` refines (one more counting pass, typically) until the set is exactly the top k.
    Neither sorts nor allocates a full-size temporary on the kernel path.

    State per parameter is AdamW's (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints
    load with ``torch.load(weights_only=True)`` and a resumed run continues identically.
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
        count_reduce: CountReduce | None = None,
        backend: str = "auto",
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
        if backend not in ("auto", "kernel", "torch", "fused"):
            raise ValueError(
                f"MoFO: backend must be auto, kernel, torch or fused, got {backend!r}")
        self.track_masks = track_masks
        self.count_reduce = count_reduce or select.identity
        self.backend = backend

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One MoFO step; ``closure`` re-evaluates the loss, as for every torch optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            positions = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            if positions:
                self._group_step(group, positions)
        return loss

    def _group_step(self, group: dict[str, Any], positions: list[int]) -> None:
        params = [group["params"][i] for i in positions]
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("MoFO does not support sparse gradients")
        states = [self._state(p) for p in params]
        steps = _host_steps(states)
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        mode = FILTERS.index(group["filter"])
        seeds = [_seed(group["seed"], i, s) for i, s in zip(positions, steps, strict=True)]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        tensors = [*params, *grads, *exp_avgs, *exp_avg_sqs]
        use_kernel = self.backend in ("auto", "kernel") and kernel.supports(tensors)
        if use_kernel and kernel.library() is None:
            if self.backend == "kernel":
                raise RuntimeError(f"MoFO kernel unavailable: {kernel.why_unavailable()}")
            use_kernel = False
        batch_type = kernel.Batch if use_kernel else self._device_batch(tensors)

        numel = self.count_reduce(torch.tensor([p.numel() for p in params], dtype=torch.int64))
        k = torch.round(group["fraction"] * numel.double()).long().clamp(min=1)
        filtered = torch.tensor([p.dim() >= 2 or group["filter_1d"] for p in params])
        filtered &= k < numel
        tolerance = torch.zeros_like(k) if group["exact"] else (k * TOLERANCE).long()
        bias2_sqrts = torch.tensor([(1 - beta2**s) ** 0.5 for s in steps], dtype=torch.float64)
        neg_steps = torch.tensor([-lr / (1 - beta1**s) for s in steps], dtype=torch.float64)
        decays = torch.full((len(params),), 1 - lr * weight_decay, dtype=torch.float64)
        hyper = (beta1, beta2, eps, group["decay_frozen"])
        lists = (params, grads, exp_avgs, exp_avg_sqs)

        # One process, cache-sized tensors: the whole step per tensor while it is in cache.
        one_by_one = use_kernel and self.count_reduce is select.identity
        small = [one_by_one and p.numel() <= kernel.CACHE_ELEMENTS for p in params]
        each = [i for i, is_small in enumerate(small) if is_small]
        rest = [i for i, is_small in enumerate(small) if not is_small]
        if getattr(batch_type, "func", batch_type) is FusedBatch:
            batch = batch_type(params, grads, exp_avgs, exp_avg_sqs, mode, seeds)
            batch.adamw = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                               steps=steps)  # fmt: skip
            moved_on_device = self._device_passes(batch, numel, k, filtered, tolerance, decays,
                                                  neg_steps, bias2_sqrts, *hyper)  # fmt: skip
            if self.track_masks:  # stays on the device: no host copy for a statistic
                for state, count in zip(states, moved_on_device.unbind(), strict=True):
                    state["moved"] = count
            return
        moved = torch.zeros(len(params), dtype=torch.int64)
        for part, whole_step in ((each, True), (rest, False)):
            if not part:
                continue
            index = torch.tensor(part, dtype=torch.int64)
            p, g, m, v = ([xs[i] for i in part] for xs in lists)
            batch = batch_type(p, g, m, v, mode, [seeds[i] for i in part])
            args = (batch, numel[index], k[index], filtered[index], tolerance[index],
                    decays[index], neg_steps[index], bias2_sqrts[index], *hyper)  # fmt: skip
            moved[index] = self._one_by_one(*args) if whole_step else self._in_passes(*args)
        if self.track_masks:
            for state, count in zip(states, moved.tolist(), strict=True):
                state["moved"] = torch.tensor(count, dtype=torch.int64)

    def _in_passes(self, batch, numel, k, filtered, tolerance, decays, neg_steps, bias2_sqrts,
                   beta1, beta2, eps, decay_all) -> Tensor:  # fmt: skip
        """Each pass over all the batch's tensors: bracket, moments + histograms, search (more
        counting passes if needed), masked step. Counts go through ``count_reduce``."""
        rows = torch.nonzero(filtered).squeeze(1)
        los = torch.zeros(len(k), dtype=torch.int64)
        shifts = torch.full((len(k),), -1, dtype=torch.int64)
        if len(rows):
            lo, hi = batch.bracket(rows, beta1, k.double() / numel.double())
            los[rows], shifts[rows] = select.agree_bracket(lo, hi, self.count_reduce)
        counts = batch.moments(beta1, beta2, los, shifts, select.BINS)

        thresholds = torch.zeros(len(k), dtype=torch.int64)
        ties = []
        if len(rows):
            chosen = select.search(
                counts[rows], los[rows], shifts[rows], k[rows],
                lambda sub, lo, shift: batch.counter(rows[sub], lo, shift, select.BINS),
                tolerance[rows], self.count_reduce,
            )  # fmt: skip
            thresholds[rows] = chosen.threshold
            ties = [(int(rows[sub]), int(chosen.tie_value[sub]), int(chosen.tie_take[sub]))
                    for sub in torch.nonzero(chosen.tie_value >= 0).squeeze(1).tolist()]
        ties = self._tie_quotas(batch, ties)
        if getattr(batch, "moves_ties", False):  # the torch path: ties inside the masked step
            return batch.update(thresholds, decays, neg_steps, bias2_sqrts, eps, decay_all, ties,
                                count=self.track_masks)  # fmt: skip
        moved = batch.update(thresholds, decays, neg_steps, bias2_sqrts, eps, decay_all)
        self._move_ties(batch, ties, moved, decays, neg_steps, bias2_sqrts, eps, decay_all)
        return moved

    def _device_batch(self, tensors: list[Tensor]) -> type:
        """The batch for tensors the C kernel does not take: the fused device passes where they
        compile (or when asked for), else the chunked torch path."""
        if self.backend == "torch" or not FusedBatch.supports(tensors):
            return TorchBatch
        where = tensors[0].device
        reason = device.compile_off_reason(where)
        if self.backend == "fused":
            if reason is not None:
                device.say_once(f"MoFO: fused device passes run eagerly: {reason}")
            return functools.partial(FusedBatch, compiled=reason is None)
        if where.type == "cpu":  # auto on the host: the kernel's fallback, no compile wait
            return TorchBatch
        if reason is not None:
            device.say_once(f"MoFO: device passes not compiled ({reason}); using the chunked "
                            f"torch path")  # fmt: skip
            return TorchBatch
        return FusedBatch

    def _device_passes(self, batch, numel, k, filtered, tolerance, decays, neg_steps,
                       bias2_sqrts, beta1, beta2, eps, decay_all) -> Tensor | None:  # fmt: skip
        """``_in_passes`` for ``FusedBatch``: brackets found on the device, so the first host
        copy is the histograms; moved counts come back on the device."""
        rows = torch.nonzero(filtered).squeeze(1).tolist()  # host tensors: no device sync
        thresholds = torch.zeros(len(k), dtype=torch.int64)
        ties = []
        if rows:
            index = torch.tensor(rows, dtype=torch.int64)
            shares = (k[index].double() / numel[index].double()).tolist()
            lo, shift = batch.device_bracket(rows, beta1, shares, self.count_reduce)
            counts, lo, shift = batch.moments_device(beta1, beta2, rows, lo, shift)
            chosen = select.search(
                counts, lo, shift, k[index],
                lambda sub, lo, shift: batch.counter(index[sub], lo, shift, select.BINS),
                tolerance[index], self.count_reduce,
            )  # fmt: skip
            thresholds[index] = chosen.threshold
            ties = [(rows[sub], int(chosen.tie_value[sub]), int(chosen.tie_take[sub]))
                    for sub in torch.nonzero(chosen.tie_value >= 0).squeeze(1).tolist()]
        else:
            batch.moments_device(beta1, beta2, [], None, None)
        ties = self._tie_quotas(batch, ties)
        return batch.update(thresholds, decays, neg_steps, bias2_sqrts, eps, decay_all, ties,
                            count=self.track_masks)  # fmt: skip

    def _one_by_one(self, batch, _numel, k, filtered, tolerance, decays, neg_steps, bias2_sqrts,
                    beta1, beta2, eps, decay_all) -> Tensor:  # fmt: skip
        """The same step and selection, tensor by tensor in C (one process only)."""
        ks = torch.where(filtered, k, torch.zeros_like(k))
        moved, tie_value, tie_take = batch.step_each(
            ks, tolerance, beta1, beta2, decays, neg_steps, bias2_sqrts, eps, decay_all,
            select.BINS,
        )  # fmt: skip
        if (moved < 0).any():
            raise RuntimeError("MoFO threshold search did not converge (inconsistent counts?)")
        ties = [(row, int(tie_value[row]), int(tie_take[row]))
                for row in torch.nonzero(tie_value >= 0).squeeze(1).tolist()]
        self._move_ties(batch, ties, moved, decays, neg_steps, bias2_sqrts, eps, decay_all)
        return moved

    def _move_ties(self, batch, ties, moved, decays, neg_steps, bias2_sqrts, eps,
                   decay_all) -> None:  # fmt: skip
        """After the masked step: move the coordinates tied at each threshold that still count
        towards k (``ties``: (row, tie value, how many)), adding them to ``moved``."""
        for row, value, take in ties:
            if take > 0:
                moved[row] += _step_ties(batch, row, value, take, float(decays[row]),
                                         float(neg_steps[row]), float(bias2_sqrts[row]), eps,
                                         decay_all)  # fmt: skip

    def _tie_quotas(self, batch, ties: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """How many tied coordinates this process moves per tie (row, value, take): all of them
        here. A hook: optimizers over sharded tensors override it so earlier shards (lower
        indices) take theirs first; both backends then move the first ``take`` in flat order."""
        return ties

    def _state(self, param: Tensor) -> dict[str, Any]:
        state = self.state[param]
        if not state:  # lazily, named and typed as torch.optim.AdamW's state
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state


def _host_steps(states: list[dict[str, Any]]) -> list[float]:
    """Increment every ``step`` and read them all. A step tensor found on a device (e.g. loaded
    by a distributed checkpoint) moves to the host in one copy for the group, where AdamW keeps
    it, so no step reads it back tensor by tensor."""
    on_device = [state for state in states if state["step"].device.type != "cpu"]
    if on_device:
        host = torch.stack([state["step"] for state in on_device]).cpu()
        for state, value in zip(on_device, host.unbind(), strict=True):
            state["step"] = value.clone()
    steps = []
    for state in states:
        state["step"] += 1
        steps.append(float(state["step"]))
    return steps


def _seed(seed: int, position: int, step: float) -> int:
    """A 32-bit seed per (group seed, tensor, step): the random filter and sampling use it."""
    return (seed * 0x9E3779B1 + position * 0x85EBCA77 + int(step) * 0xC2B2AE3D) & 0xFFFF_FFFF


def _step_ties(batch, row, tie_value, take, decay, neg_step, bias2_sqrt, eps, decay_all) -> int:
    """Move the first ``take`` coordinates (flat order) whose key equals the boundary value."""
    index = batch.tie_indices(row, tie_value, take).to(batch.p[row].device)
    p, m, v = (t.view(-1) for t in (batch.p[row], batch.m[row], batch.v[row]))
    base = p[index] if decay_all else p[index] * decay
    p[index] = base + neg_step * m[index] / (v[index].sqrt() / bias2_sqrt + eps)
    return len(index)


def _check_fraction(fraction: float) -> None:
    if not (isinstance(fraction, int | float) and 0.0 < fraction <= 1.0):
        raise ValueError(f"MoFO: fraction must be in (0, 1], got {fraction!r}")


def _check_filter(name: str) -> None:
    if name not in FILTERS:
        raise ValueError(f"MoFO: unknown filter {name!r}; choose one of {', '.join(FILTERS)}")
