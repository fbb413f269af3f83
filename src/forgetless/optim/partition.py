"""MoFO on flat ZeRO partitions: map each rank's slice of the flat buffer back to its tensors.

DeepSpeed ZeRO (1, 2 and 3) flattens a parameter group into one buffer and gives each rank a
contiguous slice of it, so the optimizer sees one 1-D tensor that mixes pieces of many
parameters. A top fraction over that slice is neither per tensor nor independent of the rank
count. :class:`PartitionedMoFO` takes the layout of the flat buffer (where each tensor starts,
its size and shape) and this rank's slice, cuts the slice into per-tensor segment views, and
runs MoFO's count-based search on them with counts summed over the data-parallel group: every
tensor gets its global per-tensor threshold, exactly as on one process with ``exact=True``.
The moments stay flat, as DeepSpeed stores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from forgetless.errors import ForgetlessError
from forgetless.optim import select
from forgetless.optim.distributed import ShardGroup
from forgetless.optim.mofo import MoFO, ParamsT


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, start + length)`` of tensor ``tensor`` (flat order) sit at
    ``[offset, offset + length)`` of this rank's partition; ``length`` may be 0."""

    tensor: int
    start: int
    offset: int
    length: int


@dataclass(frozen=True)
class FlatLayout:
    """How tensors were flattened into one buffer, and which slice of it this rank holds.

    Args:
        shapes: shape of every tensor in the buffer, in buffer order.
        starts: where each tensor begins in the buffer (DeepSpeed may align them); packed
            back to back if omitted.
        partition_start, partition_size: this rank's slice of the buffer.
    """

    shapes: Sequence[torch.Size | tuple[int, ...]]
    partition_start: int
    partition_size: int
    starts: Sequence[int] | None = None

    def segments(self) -> list[Segment]:
        """One segment per tensor, in buffer order (empty where the tensor is elsewhere)."""
        numels = [int(torch.Size(shape).numel()) for shape in self.shapes]
        starts = list(self.starts) if self.starts is not None else _packed(numels)
        if len(starts) != len(numels):
            raise ForgetlessError("FlatLayout: one start per tensor is needed")
        lo, hi = self.partition_start, self.partition_start + self.partition_size
        out = []
        for i, (begin, numel) in enumerate(zip(starts, numels, strict=True)):
            first, last = max(begin, lo), min(begin + numel, hi)
            length = max(0, last - first)
            out.append(Segment(i, first - begin if length else 0, first - lo if length else 0,
                               length))  # fmt: skip
        return out


def _packed(numels: list[int]) -> list[int]:
    starts, at = [], 0
    for numel in numels:
        starts.append(at)
        at += numel
    return starts


class PartitionedMoFO(MoFO):
    """MoFO whose parameters are flat partitions of a ZeRO-style buffer.

    Args:
        params: the flat partition tensors (or groups of them), one per parameter group.
        layouts: the :class:`FlatLayout` of every flat tensor, keyed by the tensor.
        shards: the data-parallel group the buffer is partitioned over; ``None`` = one process.
        shard_local: rank the partition's coordinates among themselves with no communication
            (the reference behaviour; each whole partition is then treated as one tensor).
        **kwargs: as :class:`~forgetless.optim.MoFO`.
    """

    def __init__(self, params: ParamsT, layouts: dict[Tensor, FlatLayout],
                 shards: ShardGroup | None = None, *, shard_local: bool = False,
                 **kwargs: Any) -> None:  # fmt: skip
        if "count_reduce" in kwargs:
            raise TypeError("PartitionedMoFO sets count_reduce itself from `shards`")
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            for flat in group["params"]:
                if flat not in layouts:
                    raise ForgetlessError("PartitionedMoFO: a flat parameter has no FlatLayout")
                if flat.dim() != 1 or flat.numel() != layouts[flat].partition_size:
                    raise ForgetlessError(
                        f"PartitionedMoFO: flat parameter of shape {tuple(flat.shape)} does not "
                        f"match its layout's partition_size {layouts[flat].partition_size}"
                    )
                if group["filter"] == "random" and shards is not None and not shard_local:
                    raise ForgetlessError(
                        "PartitionedMoFO: filter='random' hashes partition-local indices; "
                        "use shard_local=True for this ablation"
                    )
        self.layouts = layouts
        self.shards = shards
        self.shard_local = shard_local
        self._segment_states: dict[Tensor, dict[str, Any]] = {}

    def _group_step(self, group: dict[str, Any], positions: list[int]) -> None:
        if self.shard_local:  # the flat partition is one 1-D tensor: filter it as a whole
            return super()._group_step({**group, "filter_1d": True}, positions)
        self.count_reduce = select.identity if self.shards is None else self.shards.sum
        try:
            for i in positions:
                self._step_flat(group, group["params"][i])
        finally:
            self.count_reduce = select.identity
            self._segment_states.clear()

    def _step_flat(self, group: dict[str, Any], flat: Tensor) -> None:
        """Cut one flat partition into per-tensor views and step them as MoFO tensors."""
        layout = self.layouts[flat]
        state = super()._state(flat)  # flat moments, as DeepSpeed keeps them
        filtered: list[Tensor] = []
        plain: list[Tensor] = []
        for segment in layout.segments():
            part = slice(segment.offset, segment.offset + segment.length)
            view = flat.detach()[part]
            view.grad = flat.grad[part]
            self._segment_states[view] = {
                "step": state["step"].clone(),
                "exp_avg": state["exp_avg"][part],
                "exp_avg_sq": state["exp_avg_sq"][part],
            }
            is_matrix = len(layout.shapes[segment.tensor]) >= 2
            (filtered if is_matrix or group["filter_1d"] else plain).append(view)
        for views, filter_1d in ((filtered, True), (plain, False)):
            if views:  # segment views are 1-D: filter_1d says which ones MoFO filters
                sub = {**group, "params": views, "filter_1d": filter_1d}
                super()._group_step(sub, list(range(len(views))))
        state["step"] += 1
        if self.track_masks:
            moved = [self._segment_states[v].get("moved", 0) for v in [*filtered, *plain]]
            state["moved"] = torch.as_tensor(sum(int(m) for m in moved), dtype=torch.int64)

    def _state(self, param: Tensor) -> dict[str, Any]:
        segment_state = self._segment_states.get(param)
        return segment_state if segment_state is not None else super()._state(param)

    def _step_ties(self, batch, row, tie_value, take, *step_args) -> int:
        """Of the ``take`` tied coordinates to move, earlier ranks (lower flat indices) go first."""
        if self.shards is None or self.shard_local:
            return super()._step_ties(batch, row, tie_value, take, *step_args)
        found = len(batch.tie_indices(row, tie_value, take))
        quota = min(found, max(0, take - self.shards.earlier(found)))
        return super()._step_ties(batch, row, tie_value, quota, *step_args) if quota else 0
