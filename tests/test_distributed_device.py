"""Global MoFO's count all-reduces run on the collective's device: NCCL takes no host tensor.

Single process, no GPU: the group's device is simulated (``forgetless.optim.devicecheck``) and
``dist.all_reduce`` is replaced by a stand-in that, like NCCL, refuses a tensor not on it. MoFO's
selection reads counts on the host, so they must go to the device for the all-reduce and back.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from forgetless.optim import MoFO
from forgetless.optim import distributed as sharded
from forgetless.optim.devicecheck import FAKE_DEVICE, HostTraffic
from forgetless.optim.distributed import ShardedMoFO, ShardGroup
from forgetless.optim.partition import FlatLayout

OPTIONS = dict(lr=1e-2, weight_decay=0.1, fraction=0.1, exact=True)


@pytest.fixture
def nccl_like(monkeypatch):
    """``dist.all_reduce`` that accepts only device tensors (one process: the sum is itself)."""
    calls = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        if tensor.device.type != FAKE_DEVICE.type:
            raise RuntimeError(f"NCCL: tensors must be on the device, got {tensor.device}")
        calls.append(tuple(tensor.shape))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return calls


def test_counts_cross_on_the_collective_device(nccl_like):
    shapes = [torch.Size(s) for s in [(6, 7), (9,), (3, 11)]]
    torch.manual_seed(0)
    tensors = [nn.Parameter(torch.randn(s)) for s in shapes]
    flat = nn.Parameter(torch.cat([t.detach().flatten() for t in tensors]))
    optimizer = ShardedMoFO([flat], track_masks=True, **OPTIONS)
    optimizer.set_layouts({flat: FlatLayout(shapes, 0, flat.numel())},
                          ShardGroup(None, 0, 1, device=FAKE_DEVICE))
    reference = MoFO(tensors, track_masks=True, **OPTIONS)
    for step in range(2):
        generator = torch.Generator().manual_seed(step)  # few values: ties at the threshold
        grads = [torch.randint(-2, 3, s, generator=generator).float() for s in shapes]
        flat.grad = torch.cat([g.flatten() for g in grads])
        for t, g in zip(tensors, grads, strict=True):
            t.grad = g
        with HostTraffic(simulate=True):
            optimizer.step()
        reference.step()
    assert nccl_like  # the selection did all-reduce its counts
    assert torch.equal(flat.detach(), torch.cat([t.detach().flatten() for t in tensors]))
    assert int(optimizer.state[flat]["moved"]) == sum(
        int(reference.state[t]["moved"]) for t in tensors)


def test_the_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert ShardGroup(None, 0, 2).device == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert ShardGroup(None, 0, 2).device == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(sharded, "_accelerator", lambda: torch.device("cuda", 3))
    assert ShardGroup(None, 0, 2).device == torch.device("cuda", 3)
    assert ShardGroup(None, 0, 2, device=torch.device("cpu")).device == torch.device("cpu")
