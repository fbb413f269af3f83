"""Where each tensor's elements sit in a rank's flat partition (DeepSpeed ZeRO-style buffers).

ZeRO flattens a parameter group into one buffer and gives each rank a contiguous slice, so the
optimizer sees one 1-D tensor mixing pieces of many parameters; a top fraction over that slice is
neither per tensor nor independent of the rank count. A layout names, for every tensor of the
buffer, the piece this rank holds (a :class:`Segment`, possibly empty), so
:class:`~forgetless.optim.distributed.ShardedMoFO` can cut the partition into per-tensor views
and give each tensor its global threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from forgetless.errors import ForgetlessError


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


@dataclass(frozen=True)
class PerTensorLayout:
    """Each tensor cut into ``world`` equal chunks (the last one padded), this rank's chunks
    concatenated in tensor order: how ZeRO-3 partitions a parameter sub-group."""

    shapes: Sequence[torch.Size | tuple[int, ...]]
    rank: int
    world: int

    @property
    def partition_size(self) -> int:
        return sum(-(-int(torch.Size(s).numel()) // self.world) for s in self.shapes)

    def segments(self) -> list[Segment]:
        out, offset = [], 0
        for i, shape in enumerate(self.shapes):
            numel = int(torch.Size(shape).numel())
            chunk = -(-numel // self.world)
            start = self.rank * chunk
            length = max(0, min(chunk, numel - start))
            out.append(Segment(i, start if length else 0, offset, length))
            offset += chunk
        return out
