"""DeepSpeed ZeRO-1/2/3: tell MoFO where each tensor lies in DeepSpeed's flat fp32 partitions.

``deepspeed.initialize`` replaces the parameters of the optimizer it is given (the "client"
optimizer) by flat fp32 partitions. :func:`attach_zero` reads, from DeepSpeed's ZeRO optimizer,
which piece of which tensor each partition holds and hands that to the client
:class:`~forgetless.optim.distributed.ShardedMoFO`, which then selects per whole tensor with
counts all-reduced over the data-parallel group. It reads DeepSpeed internals, checked against
deepspeed 0.19.8 (ZeRO-1/2: ``DeepSpeedZeroOptimizer``, ZeRO-3: ``DeepSpeedZeroOptimizer_Stage3``);
an unknown layout is refused with an error rather than guessed.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor
from transformers import TrainerCallback

from forgetless.errors import ForgetlessError
from forgetless.optim.distributed import Layout, ShardedMoFO, ShardGroup
from forgetless.optim.partition import FlatLayout, PerTensorLayout

STAGE12 = "DeepSpeedZeroOptimizer"
STAGE3 = "DeepSpeedZeroOptimizer_Stage3"
WORKING = "ZeRO-1/2, or ZeRO-3 without NVMe/partial optimizer offload, one data-parallel group"


def attach_zero(obj: Any) -> ShardedMoFO:
    """Give the MoFO inside a DeepSpeed engine (or ZeRO optimizer, or accelerate's wrapper of
    either) the layouts of its flat partitions; returns that MoFO. Call it once after
    ``deepspeed.initialize`` (``ZeroLayoutCallback`` does it for the transformers Trainer)."""
    zero = find_zero(obj)
    if zero is None:
        raise ForgetlessError(f"attach_zero: no DeepSpeed ZeRO optimizer in {type(obj).__name__}")
    kind = type(zero).__name__
    client = zero.optimizer
    if not isinstance(client, ShardedMoFO):
        raise ForgetlessError(
            f"attach_zero: DeepSpeed steps a {type(client).__name__}; give deepspeed.initialize "
            f"a forgetless.optim.distributed.ShardedMoFO"
        )
    layouts, shards = _stage12(zero) if kind == STAGE12 else _stage3(zero)
    client.set_layouts(layouts, shards)
    return client


def find_zero(obj: Any) -> Any | None:
    """The DeepSpeed ZeRO optimizer in an engine or (wrapped) optimizer, else ``None``."""
    for _ in range(8):  # engine -> accelerate wrapper -> ZeRO optimizer -> client
        if type(obj).__name__ in (STAGE12, STAGE3):
            return obj
        obj = getattr(obj, "optimizer", None)
    return None


def _one_group(groups: list[Any]) -> ShardGroup:
    if len({id(group) for group in groups}) != 1:
        raise ForgetlessError(
            f"MoFO under DeepSpeed: parameter groups partitioned over different process groups "
            f"(MoE expert parallelism?) are not supported; supported: {WORKING}"
        )
    group = groups[0]
    return ShardGroup(group, dist.get_rank(group=group), dist.get_world_size(group=group))


def _stage12(zero: Any) -> tuple[dict[Tensor, Layout], ShardGroup]:
    """ZeRO-1/2: each group is one aligned flat buffer cut into equal contiguous partitions."""
    try:
        shards = _one_group(list(zero.real_dp_process_group))
        layouts: dict[Tensor, Layout] = {}
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            parts = zero.parallel_partitioned_bit16_groups[i]
            start = sum(int(part.numel()) for part in parts[: shards.rank])
            shapes = [meta.shape for meta in zero.round_robin_bit16_meta[i]]
            starts = [int(offset) for offset in zero.round_robin_bit16_offsets[i]]
            layouts[flat] = FlatLayout(shapes, start, int(parts[shards.rank].numel()), starts)
    except AttributeError as err:
        raise ForgetlessError(f"MoFO under DeepSpeed ZeRO-1/2: unknown layout ({err})") from err
    return layouts, shards


def _stage3(zero: Any) -> tuple[dict[Tensor, Layout], ShardGroup]:
    """ZeRO-3: every tensor is split into equal chunks; a sub-group concatenates its chunks."""
    if getattr(zero, "swap_optimizer", False) or getattr(zero, "backup_optimizer", None):
        raise ForgetlessError(f"MoFO under ZeRO-3 with NVMe/partial offload; supported: {WORKING}")
    try:
        shards = _one_group([zero.dp_process_group])
        layouts: dict[Tensor, Layout] = {}
        for flat, params in zip(zero.fp32_partitioned_groups_flat, zero.fp16_groups, strict=True):
            layouts[flat] = PerTensorLayout([p.ds_shape for p in params], shards.rank, shards.size)
    except AttributeError as err:
        raise ForgetlessError(f"MoFO under DeepSpeed ZeRO-3: unknown layout ({err})") from err
    return layouts, shards


class ZeroLayoutCallback(TrainerCallback):
    """For the transformers Trainer under DeepSpeed: attach the layouts when training begins."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None and find_zero(optimizer) is not None:
            attach_zero(optimizer)
        return control
