"""Bytes all-reduced per MoFO step to find global per-tensor thresholds over sharded tensors.

    .venv/bin/python bench/threshold_comm.py [--tensors 4,16] [--numels 16384,262144,1048576]
        [--bins 256,1024] [--world 2] [--steps 3]

Runs ``world`` gloo processes on 127.0.0.1; each holds a Shard(0) DTensor slice of ``tensors``
float32 matrices and steps :class:`~forgetless.optim.distributed.ShardedMoFO` (exact mode). Every
count vector the threshold search all-reduces is counted (payload bytes, as handed to
``all_reduce``; a ring all-reduce moves about twice that per process). Gathering the tensors
instead would move ``numel * 4`` bytes each. What is reduced: one size per tensor, a bracket
(3 numbers) per tensor, then per histogram pass BINS + 1 counts per tensor still searching; so
the payload is tensors x bins x passes, and only the pass count (1 to MAX_PASSES, 8) varies with
the data. The "hists/tensor" column is bytes / tensors / ((bins + 1) * 8): about that many passes.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLUMNS = 64


def _measure(rank: int, world: int, tensors: int, numel: int, bins: int, steps: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from forgetless.optim import select
    from forgetless.optim.distributed import ShardedMoFO, ShardGroup

    select.BINS, select.REFINE_SHIFT = bins, bins.bit_length() - 1  # power-of-two bins
    mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(0)
    shape = (numel // COLUMNS, COLUMNS)
    params = [
        torch.nn.Parameter(distribute_tensor(torch.randn(shape, generator=generator), mesh,
                                             [Shard(0)]))  # fmt: skip
        for _ in range(tensors)
    ]
    optimizer = ShardedMoFO(params, lr=1e-3, fraction=0.1, exact=True)
    calls, payload = [], []
    original = ShardGroup.sum

    def counting_sum(self, counts):
        calls[-1] += 1
        payload[-1] += counts.numel() * counts.element_size()
        return original(self, counts)

    ShardGroup.sum = counting_sum
    try:
        for _ in range(steps):
            for p in params:
                grad = torch.randn(shape, generator=generator)
                p.grad = distribute_tensor(grad, mesh, [Shard(0)])
            calls.append(0)
            payload.append(0)
            optimizer.step()
    finally:
        ShardGroup.sum = original
    return {"calls": statistics.mean(calls), "bytes": statistics.mean(payload)}


def _worker(rank: int, world: int, port: int, grid: list[tuple[int, int, int]], steps: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if rank == 0:
            print(f"world={world}, {steps} steps each, exact mode, payload per process per step")
            print(f"{'tensors':>7} {'numel/tensor':>12} {'bins':>5} {'all-reduces':>11} "
                  f"{'bytes/step':>11} {'bytes/tensor':>12} {'hists/tensor':>12} "
                  f"{'gather bytes':>13}")  # fmt: skip
        for tensors, numel, bins in grid:
            got = _measure(rank, world, tensors, numel, bins, steps)
            if rank == 0:
                gather = tensors * numel * 4
                print(f"{tensors:>7} {numel:>12} {bins:>5} {got['calls']:>11.1f} "
                      f"{got['bytes']:>11,.0f} {got['bytes'] / tensors:>12,.0f} "
                      f"{got['bytes'] / tensors / ((bins + 1) * 8):>12.2f} "
                      f"{gather:>13,}", flush=True)  # fmt: skip
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", default="4,16")
    parser.add_argument("--numels", default="16384,262144,1048576")
    parser.add_argument("--bins", default="256,1024")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    tensors, numels, bins = ints(args.tensors), ints(args.numels), ints(args.bins)
    grid = [(t, n, b) for b in bins for t in tensors for n in numels]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(args.world, port, grid, args.steps), nprocs=args.world)


if __name__ == "__main__":
    main()
