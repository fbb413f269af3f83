"""MoFO on sharded parameters (FSDP2 / DTensor): the same per-tensor top fraction at any scale.

MoFO moves, in every tensor, the coordinates whose |momentum| is in the top ``fraction`` of
*that tensor*. The authors' code runs the selection on whatever slice an optimizer sees, so
under ZeRO or FSDP what trains depends on the number of GPUs. Here each process keeps its
shard and the selection is global anyway: the threshold search of ``forgetless.optim.select``
only reads counts (sizes, histograms), so summing those small vectors over the shard's process
group gives every rank the same global threshold. The bytes sent grow with the number of
tensors and bins; tensor size only changes how many histogram passes a search takes (1 to 2
measured, 8 at most), never the size of a message (see ``bench/threshold_comm.py``).

- DDP: every rank holds whole replicated tensors with identical, all-reduced gradients, so plain
  :class:`~forgetless.optim.MoFO` is already exact and no collective is added.
- FSDP2 (``fully_shard``): parameters are DTensors sharded on dim 0. Counts are all-reduced
  over the mesh dimension that shards them, and ties at the threshold are broken by global flat
  index (shards are contiguous flat ranges in rank order). With ``exact=True`` the moved set
  equals a single process's bit for bit; the fast mode keeps its 0.2 % count tolerance on the
  whole tensor, but its boundary bin depends on where each shard sampled, so edge coordinates
  may differ from a single process.
- DeepSpeed ZeRO-1/2/3: the optimizer sees flat partitions mixing many tensors. Given their
  layouts (``set_layouts``; ``forgetless.optim.zero.attach_zero`` reads them from DeepSpeed),
  each partition is cut into per-tensor views that take the same global thresholds, the
  moments staying flat as DeepSpeed stores them. Without layouts a replaced parameter is refused.
- ``shard_local=True``: each shard (or whole flat partition) selects its own top fraction with
  no communication, the reference code's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from forgetless.errors import ForgetlessError
from forgetless.optim import select
from forgetless.optim.mofo import MoFO, ParamsT
from forgetless.optim.partition import FlatLayout, PerTensorLayout

Layout = FlatLayout | PerTensorLayout


@dataclass(frozen=True, eq=False)
class ShardGroup:
    """The processes holding the shards of a tensor, and this process's place among them.

    Shard ``rank`` must hold the flat index range right after shard ``rank - 1``'s, which is
    how FSDP2 (``Shard(0)``) and ZeRO partitions lay tensors out. ``device`` is where the
    group's collectives take their tensors (``None``: from its backend, see
    :func:`collective_device`); MoFO's counts live on the host and cross on it.
    """

    group: Any  # a torch.distributed ProcessGroup (None = the default group)
    rank: int
    size: int
    device: torch.device | None = None

    def __post_init__(self) -> None:
        if self.device is None:
            object.__setattr__(self, "device", collective_device(self.group))

    def sum(self, counts: Tensor) -> Tensor:
        """Elementwise sum of a count tensor over the shards: MoFO's ``count_reduce``. The
        counts go to the collective's device (NCCL refuses host tensors) and come back to
        ``counts``' device, where the threshold search reads them."""
        moved = counts.to(self.device, copy=True)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=self.group)
        return moved.to(counts.device)

    def earlier(self, count: int) -> int:
        """Sum of ``count`` over the shards before this one (one small all-reduce)."""
        return self.earlier_each([count])[0]

    def earlier_each(self, counts: list[int]) -> list[int]:
        """:meth:`earlier` of several counts at once, in one all-reduce."""
        slots = torch.zeros(len(counts), self.size, dtype=torch.int64)
        slots[:, self.rank] = torch.tensor(counts, dtype=torch.int64)
        return self.sum(slots)[:, : self.rank].sum(1).tolist()


def _accelerator() -> torch.device:
    """This process's current accelerator (CUDA, XPU, ...)."""
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:
        raise ForgetlessError("MoFO: the process group needs device tensors but this process "
                              "sees no accelerator")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def collective_device(group: Any = None) -> torch.device:
    """Where ``group``'s collectives take tensors: the host if its backend serves CPU tensors
    (gloo, MPI, or a ``cpu:gloo,cuda:nccl`` pair), else the current accelerator (NCCL, ...).
    Not the parameters' device: ZeRO-offload and FSDP2 CPU offload keep those on the host while
    their group is NCCL."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    return _accelerator()


def shard_group_of(param: Tensor) -> ShardGroup | None:
    """The shard group of a DTensor parameter, or ``None`` for a whole (replicated) tensor."""
    if not isinstance(param, DTensor):
        return None
    placements = param.placements
    sharded = [dim for dim, placement in enumerate(placements) if placement.is_shard()]
    plain = all(type(p) in (Shard, Replicate) for p in placements)
    if not sharded:
        if not plain:
            raise ForgetlessError(f"MoFO: unsupported DTensor placements {placements}")
        return None
    if not plain or len(sharded) > 1 or placements[sharded[0]].dim != 0:
        raise ForgetlessError(
            f"MoFO: global selection supports parameters sharded on dim 0 over one mesh "
            f"dimension (FSDP2 fully_shard, HSDP); got placements {placements}. "
            f"Use shard_local=True for a per-shard selection."
        )
    mesh, mesh_dim = param.device_mesh, sharded[0]
    return ShardGroup(mesh.get_group(mesh_dim), mesh.get_local_rank(mesh_dim), mesh.size(mesh_dim))


def _replaced(param: Tensor, given: set[int]) -> bool:
    """A plain 1-D parameter the optimizer was not built with: a flat partition in disguise.
    (accelerate's FSDP2 preparation also swaps parameters, but for DTensors of the same shape.)"""
    return id(param) not in given and not isinstance(param, DTensor) and param.dim() == 1


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ShardedMoFO(MoFO):
    """:class:`~forgetless.optim.MoFO` that also takes FSDP2 (DTensor) and ZeRO (flat) shards.

    On whole tensors it is exactly ``MoFO``. On a DTensor sharded on dim 0 it steps the local
    shard, in place, with the threshold of the whole tensor (or of the shard if ``shard_local``).
    A flat partition declared with :meth:`set_layouts` is stepped per tensor piece likewise.
    Optimizer state stays DTensors shaped like the parameters, so FSDP2's distributed
    checkpointing (``get_optimizer_state_dict``) works as for AdamW. ``state[p]["moved"]``
    (``track_masks``) counts this shard's moved coordinates.

    Args:
        params, **kwargs: as :class:`~forgetless.optim.MoFO` (``count_reduce`` is set here).
        shard_local: select per shard without communication (the reference code's behaviour);
            the moved set then depends on the number of shards.
    """

    def __init__(self, params: ParamsT, *args: Any, shard_local: bool = False, **kwargs: Any):
        if "count_reduce" in kwargs:
            raise TypeError("ShardedMoFO sets count_reduce itself from each parameter's mesh")
        self._given: set[int] = set()  # ids of the parameters handed to this optimizer
        super().__init__(params, *args, **kwargs)
        self.shard_local = shard_local
        self.layouts: dict[Tensor, Layout] = {}  # flat partition -> where its tensors are
        self.partition_shards: ShardGroup | None = None  # the group the partitions span
        self._shards: ShardGroup | None = None  # the shard group of the tensors being stepped
        self._owners: dict[Tensor, Tensor] = {}  # local shard -> its DTensor, during a step
        self._segment_states: dict[Tensor, dict[str, Any]] = {}  # segment view -> its state
        self._views: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        self._given.update(id(p) for p in params)
        super().add_param_group({**param_group, "params": params})

    def set_layouts(self, layouts: dict[Tensor, Layout], shards: ShardGroup | None) -> None:
        """Declare flat partitions (ZeRO): ``layouts[flat]`` says which tensor pieces it holds,
        ``shards`` the process group the buffers are partitioned over (``None``: one process)."""
        for flat, layout in layouts.items():
            if flat.dim() != 1 or flat.numel() != layout.partition_size:
                raise ForgetlessError(
                    f"MoFO: flat partition of shape {tuple(flat.shape)} does not match its "
                    f"layout's partition_size {layout.partition_size}"
                )
        self.layouts = dict(layouts)
        self.partition_shards = shards

    def _group_step(self, group: dict[str, Any], positions: list[int]) -> None:
        """Step the group's tensors in batches of one shard group each (usually one batch)."""
        batches: dict[Any, tuple[ShardGroup | None, list[int]]] = {}
        for i in positions:
            param = group["params"][i]
            if param in self.layouts:
                self._step_flat(group, param)
                continue
            if _replaced(param, self._given) and not self.shard_local:
                raise ForgetlessError(
                    "MoFO: a parameter was replaced after the optimizer was built (DeepSpeed "
                    "ZeRO's flat partitions?) and has no layout; call "
                    "forgetless.optim.zero.attach_zero(engine) after deepspeed.initialize, or "
                    "pass shard_local=True for the per-partition reference selection"
                )
            shards = shard_group_of(param)
            key = None if shards is None else id(shards.group)
            batches.setdefault(key, (shards, []))[1].append(i)
        for shards, batch in batches.values():
            self._step_sharded(group, batch, None if self.shard_local else shards)

    def _step_sharded(self, group: dict[str, Any], positions: list[int],
                      shards: ShardGroup | None) -> None:  # fmt: skip
        if shards is not None and group["filter"] == "random":
            raise ForgetlessError(
                "MoFO: filter='random' hashes shard-local indices, so its mask would depend on "
                "the sharding; use shard_local=True or an unsharded model for this ablation"
            )
        params = group["params"]
        local = {i: _local(params[i]) for i in positions}
        for i, shard in local.items():
            if shard is not params[i]:
                self._owners[shard] = params[i]
                shard.grad = _local(params[i].grad)
        views: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []
        self._views = views
        self._shards = shards
        self.count_reduce = select.identity if shards is None else shards.sum
        try:
            local_params = [local.get(i, p) for i, p in enumerate(params)]
            super()._group_step({**group, "params": local_params}, positions)
        finally:
            for state, view, before in views:  # keys MoFO set or dropped reach the real state
                for key, value in view.items():
                    if before.get(key) is not value:
                        state[key] = value
                for key in before.keys() - view.keys():
                    state.pop(key, None)
            for i, shard in local.items():
                if shard is not params[i]:
                    shard.grad = None
            self._owners.clear()
            self._shards, self._views = None, []
            self.count_reduce = select.identity

    def _step_flat(self, group: dict[str, Any], flat: Tensor) -> None:
        """Cut one flat partition into per-tensor views and step them as whole tensors would."""
        if self.shard_local:  # the reference: the partition is one tensor, filtered as a whole
            self._step_sharded({**group, "params": [flat], "filter_1d": True}, [0], None)
            return
        layout, shards = self.layouts[flat], self.partition_shards
        state = super()._state(flat)  # flat moments, as DeepSpeed keeps them
        views: tuple[list[Tensor], list[Tensor]] = ([], [])  # (filtered, AdamW-only)
        for segment in layout.segments():
            part = slice(segment.offset, segment.offset + segment.length)
            view = flat.detach()[part]
            view.grad = flat.grad[part]
            self._segment_states[view] = {
                "step": state["step"].clone(),
                "exp_avg": state["exp_avg"][part],
                "exp_avg_sq": state["exp_avg_sq"][part],
            }
            matrix = len(layout.shapes[segment.tensor]) >= 2
            views[0 if matrix or group["filter_1d"] else 1].append(view)
        try:  # views are 1-D: filter_1d picks which ones MoFO filters
            for batch, filter_1d in zip(views, (True, False), strict=True):
                if batch:
                    sub = {**group, "params": batch, "filter_1d": filter_1d}
                    self._step_sharded(sub, list(range(len(batch))), shards)
            state["step"] += 1
            if self.track_masks:
                moved = [self._segment_states[v].get("moved", 0) for v in views[0] + views[1]]
                state["moved"] = torch.tensor(sum(int(m) for m in moved), dtype=torch.int64)
        finally:
            self._segment_states.clear()

    def _state(self, param: Tensor) -> dict[str, Any]:
        segment_state = self._segment_states.get(param)
        if segment_state is not None:
            return segment_state
        owner = self._owners.get(param)
        if owner is None:
            return super()._state(param)
        state = super()._state(owner)  # DTensor moments, like the parameter
        view = {key: _local(value) for key, value in state.items()}
        self._views.append((state, view, dict(view)))
        return view

    def _tie_quotas(self, batch, ties: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """Of the ``take`` tied coordinates to move, earlier shards (lower indices) go first:
        one count per tie on this shard, one all-reduce for all the group's ties."""
        if self._shards is None or not ties:
            return ties
        found = batch.tie_counts(ties)
        before = self._shards.earlier_each(found)
        return [
            (row, value, min(here, max(0, take - earlier)))
            for (row, value, take), here, earlier in zip(ties, found, before, strict=True)
        ]
