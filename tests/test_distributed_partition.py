"""Single-process checks of the sharded MoFO pieces: flat-partition mapping, wrappers = MoFO."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from forgetless.errors import ForgetlessError
from forgetless.optim import MoFO
from forgetless.optim.distributed import ShardedMoFO, shard_group_of
from forgetless.optim.partition import FlatLayout, PerTensorLayout, Segment

OPTIONS = dict(lr=1e-2, weight_decay=0.1, fraction=0.1, exact=True)


def test_segments_of_aligned_buffer_split_over_two_ranks():
    shapes = [(3, 2), (5,), (2, 2)]  # numels 6, 5, 4 at aligned starts 0, 8, 16 (size 20)
    rank0 = FlatLayout(shapes, 0, 10, starts=[0, 8, 16]).segments()
    rank1 = FlatLayout(shapes, 10, 10, starts=[0, 8, 16]).segments()
    assert rank0 == [Segment(0, 0, 0, 6), Segment(1, 0, 8, 2), Segment(2, 0, 0, 0)]
    assert rank1 == [Segment(0, 0, 0, 0), Segment(1, 2, 0, 3), Segment(2, 0, 6, 4)]
    total = sum(s.length for s in rank0 + rank1)
    assert total == 6 + 5 + 4


def test_packed_layout_and_wrong_starts():
    assert FlatLayout([(4,), (2, 3)], 2, 6).segments() == [Segment(0, 2, 0, 2),
                                                           Segment(1, 0, 2, 4)]  # fmt: skip
    with pytest.raises(ForgetlessError, match="one start per tensor"):
        FlatLayout([(4,), (2, 3)], 0, 10, starts=[0]).segments()


def _tensors_and_grads(step: int) -> tuple[list[torch.Size], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(step)
    shapes = [torch.Size(s) for s in [(6, 7), (9,), (3, 11)]]
    return shapes, [torch.randn(s, generator=generator) for s in shapes]


def test_flat_partition_on_one_rank_equals_mofo():
    """The whole buffer as one partition: per-tensor selection, 1-D tensors unfiltered."""
    shapes, _ = _tensors_and_grads(0)
    torch.manual_seed(0)
    tensors = [nn.Parameter(torch.randn(s)) for s in shapes]
    flat = nn.Parameter(torch.cat([t.detach().flatten() for t in tensors]))
    layout = FlatLayout(shapes, 0, flat.numel())
    optimizer = ShardedMoFO([flat], track_masks=True, **OPTIONS)
    optimizer.set_layouts({flat: layout}, None)
    reference = MoFO(tensors, track_masks=True, **OPTIONS)
    for step in range(3):
        _, grads = _tensors_and_grads(step)
        flat.grad = torch.cat([g.flatten() for g in grads])
        for t, g in zip(tensors, grads, strict=True):
            t.grad = g
        optimizer.step()
        reference.step()
    assert torch.equal(flat.detach(), torch.cat([t.detach().flatten() for t in tensors]))
    moved = sum(int(reference.state[t]["moved"]) for t in tensors)
    assert int(optimizer.state[flat]["moved"]) == moved
    assert float(optimizer.state[flat]["step"]) == 3.0


def test_flat_partition_shard_local_ranks_the_whole_partition():
    shapes, grads = _tensors_and_grads(0)
    flat = nn.Parameter(torch.zeros(sum(s.numel() for s in shapes)))
    optimizer = ShardedMoFO([flat], shard_local=True, track_masks=True, **OPTIONS)
    optimizer.set_layouts({flat: FlatLayout(shapes, 0, flat.numel())}, None)
    flat.grad = torch.cat([g.flatten() for g in grads])
    optimizer.step()
    assert int(optimizer.state[flat]["moved"]) == round(0.1 * flat.numel())


def test_flat_partitions_need_a_matching_layout():
    flat = nn.Parameter(torch.zeros(10))
    optimizer = ShardedMoFO([nn.Parameter(torch.zeros(2, 5))], **OPTIONS)
    with pytest.raises(ForgetlessError, match="partition_size 12"):
        optimizer.set_layouts({flat: FlatLayout([(12,)], 0, 12)}, None)
    optimizer.param_groups[0]["params"] = [flat]  # what DeepSpeed ZeRO does to its optimizer
    flat.grad = torch.ones(10)
    with pytest.raises(ForgetlessError, match="attach_zero"):
        optimizer.step()


def test_per_tensor_layout_is_zero3_partitioning():
    shapes = [(5,), (2, 2)]  # chunks of 3 and 2 per rank; rank 1 holds 2 of the 5 and 2 of 4
    assert PerTensorLayout(shapes, 1, 2).segments() == [Segment(0, 3, 0, 2), Segment(1, 2, 3, 2)]
    assert PerTensorLayout(shapes, 1, 2).partition_size == 5
    assert PerTensorLayout([(1,)], 1, 2).segments() == [Segment(0, 0, 0, 0)]


def test_sharded_mofo_on_whole_tensors_is_mofo():
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    optimizer, reference = ShardedMoFO(a, **OPTIONS), MoFO(b, **OPTIONS)
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        for p, q in zip(a, b, strict=True):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    with pytest.raises(TypeError, match="count_reduce"):
        ShardedMoFO(a, count_reduce=lambda c: c)


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    yield
    dist.destroy_process_group()


def test_shard_group_of_dtensor_placements(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    rows = distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)])
    shards = shard_group_of(rows)
    assert (shards.rank, shards.size) == (0, 1)
    assert shard_group_of(distribute_tensor(torch.zeros(4, 3), mesh, [Replicate()])) is None
    assert shard_group_of(torch.zeros(2)) is None
    with pytest.raises(ForgetlessError, match="shard_local=True"):
        shard_group_of(distribute_tensor(torch.zeros(4, 3), mesh, [Shard(1)]))
