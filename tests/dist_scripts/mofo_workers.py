"""Multi-process MoFO checks (gloo, CPU): ``python mofo_workers.py S1,S2,... WORLD PORT OUT``.

Each scenario runs on every rank next to a single-process reference that is fed the very same
global gradients, so any difference is the optimizer's doing (not reduction order). The
scenarios share one launch (process start-up dominates on CPU). After each scenario rank 0
writes ``{scenario: summary}`` so far to OUT; a mismatch raises and the launcher exits non-zero.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (tiny_models)

from forgetless.optim import MoFO  # noqa: E402
from forgetless.optim.distributed import ShardedMoFO, ShardGroup  # noqa: E402
from forgetless.optim.partition import FlatLayout  # noqa: E402

STEPS = 4
OPTIONS = dict(lr=1e-2, weight_decay=0.1, fraction=0.1, exact=True, track_masks=True)


def _same(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.equal(got, want):
        diff = (got != want).sum().item()
        raise AssertionError(f"{name}: {diff} of {want.numel()} entries differ from 1 process")


def _batch(rank: int, step: int) -> torch.Tensor:
    """Token ids, different on every rank and step."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(3, 128, (2, 12), generator=generator)


def ddp(rank: int, world: int) -> dict:
    """DDP: plain MoFO on replicated tensors equals one process stepping the averaged gradient."""
    from tiny_models import tiny_model

    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    wrapped = nn.parallel.DistributedDataParallel(model)
    optimizer = MoFO(model.parameters(), **OPTIONS)
    ref_optimizer = MoFO(reference.parameters(), **OPTIONS)
    moved = 0
    for step in range(STEPS):
        ids = _batch(rank, step)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            q.grad = p.grad.clone()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        ref_optimizer.step()
        for (name, p), q, old in zip(model.named_parameters(), reference.parameters(), before,
                                     strict=True):  # fmt: skip
            _same(f"step {step} {name}", p.detach(), q.detach())
            mask = (p.detach() != old).flatten()
            masks = [torch.empty_like(mask) for _ in range(world)]
            dist.all_gather(masks, mask)
            for other in masks:
                _same(f"step {step} {name} mask across ranks", other, mask)
            moved += int(mask.sum())
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
    return {"steps": STEPS, "moved": moved}


def fsdp2(rank: int, world: int) -> dict:
    """FSDP2: ShardedMoFO on DTensor shards equals one process on the whole tensors."""
    from torch.distributed.fsdp import fully_shard

    from tiny_models import tiny_model

    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = ShardedMoFO(model.parameters(), **OPTIONS)
    ref_optimizer = MoFO(reference.parameters(), **OPTIONS)
    named = list(model.named_parameters())
    moved = 0
    for step in range(STEPS):
        ids = _batch(rank, step)
        model(input_ids=ids, labels=ids).loss.backward()
        for (_, p), q in zip(named, reference.parameters(), strict=True):
            q.grad = p.grad.full_tensor()  # test only: the optimizer never gathers
        optimizer.step()
        ref_optimizer.step()
        for (name, p), q in zip(named, reference.parameters(), strict=True):
            _same(f"step {step} {name}", p.full_tensor(), q.detach())
            local = optimizer.state[p]["moved"].reshape(1).clone()
            dist.all_reduce(local)
            _same(f"step {step} {name} moved", local[0], ref_optimizer.state[q]["moved"])
            if set(optimizer.state[p]) != set(ref_optimizer.state[q]):  # e.g. a kept threshold
                raise AssertionError(f"{name}: state keys {set(optimizer.state[p])} differ")
            moved += int(local)
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
    _checkpoint_roundtrip(model, optimizer, rank)
    fast = ShardedMoFO(model.parameters(), **{**OPTIONS, "exact": False})
    ids = _batch(rank, STEPS)
    model(input_ids=ids, labels=ids).loss.backward()
    fast.step()
    worst = 0.0
    for _, p in named:
        local = fast.state[p]["moved"].reshape(1).clone()
        dist.all_reduce(local)
        k = max(1, round(OPTIONS["fraction"] * p.numel()))
        if p.dim() >= 2 and k < p.numel():
            worst = max(worst, abs(int(local) - k) / k)
    if worst > 0.002:  # MoFO's fast-mode tolerance, on the whole tensor
        raise AssertionError(f"fast mode moved {worst:.2%} away from k on a sharded tensor")
    return {"steps": STEPS, "moved": moved, "sharded": type(named[0][1]).__name__,
            "fast_worst_relative_count_error": worst}  # fmt: skip


def _checkpoint_roundtrip(model: nn.Module, optimizer: ShardedMoFO, rank: int) -> None:
    """DTensor state goes through torch.distributed.checkpoint's optimizer state dict: a fresh
    optimizer loaded from it takes the same next step as the original."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    saved = copy.deepcopy(get_optimizer_state_dict(model, optimizer))  # it shares tensors
    weights = [p.detach().clone() for p in model.parameters()]
    ids = _batch(rank, 99)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.step()
    after = [p.full_tensor() for p in model.parameters()]
    with torch.no_grad():
        for p, w, g in zip(model.parameters(), weights, grads, strict=True):
            p.copy_(w)
            p.grad = g
    restored = ShardedMoFO(model.parameters(), **OPTIONS)
    set_optimizer_state_dict(model, restored, saved)
    restored.step()
    for i, (p, want) in enumerate(zip(model.parameters(), after, strict=True)):
        _same(f"resumed step, tensor {i}", p.full_tensor(), want)
    model.zero_grad()


def _crafted_grads(step: int) -> dict[str, torch.Tensor]:
    """Uneven rows (7 over 2 ranks), all large values in rank 0's shard, and a tie block."""
    generator = torch.Generator().manual_seed(step)
    skewed = torch.rand(7, 10, generator=generator)
    skewed[:4] += 10.0  # rank 0 holds rows 0-3: the global top 10 % all lie there
    tied = torch.full((5, 8), 0.5)
    tied[0, :2] = 2.0  # k = 4: two clear winners, then 38 ties for two places
    return {"skewed": skewed, "tied": tied}


def crafted(rank: int, world: int) -> dict:
    """Ties, uneven shards and skew: global vs shard-local selection on FSDP2 DTensors."""
    from torch.distributed.fsdp import fully_shard

    def build() -> nn.Module:
        torch.manual_seed(0)
        module = nn.Module()
        module.skewed = nn.Parameter(torch.randn(7, 10))
        module.tied = nn.Parameter(torch.randn(5, 8))
        return module

    reference = build()
    ref_optimizer = MoFO(reference.parameters(), **OPTIONS)
    results = {}
    for shard_local in (False, True):
        module = build()
        fully_shard(module)
        optimizer = ShardedMoFO(module.parameters(), shard_local=shard_local, **OPTIONS)
        for step in range(STEPS):
            grads = _crafted_grads(step)
            for name, p in module.named_parameters():
                full = grads[name]
                p.grad = torch.distributed.tensor.distribute_tensor(
                    full, p.device_mesh, p.placements
                )
                if not shard_local:
                    getattr(reference, name).grad = full.clone()
            optimizer.step()
            if not shard_local:
                ref_optimizer.step()
        rows = {}
        for name, p in module.named_parameters():
            local = optimizer.state[p]["moved"].reshape(1).clone()
            dist.all_reduce(local)
            full = p.full_tensor()
            ref = getattr(reference, name)
            if not shard_local:
                _same(f"crafted {name}", full, ref.detach())
                _same(f"crafted {name} moved", local[0], ref_optimizer.state[ref]["moved"])
            rows[name] = {
                "moved_last_step": int(local),
                "equal_to_one_process": torch.equal(full, ref.detach()),
            }
        results["shard_local" if shard_local else "global"] = rows
    return results


def zero(rank: int, world: int) -> dict:
    """A simulated ZeRO flat partition (aligned starts, padding) equals one process."""
    shapes = [(7, 5), (3,), (4, 6), (1, 9), (5,)]
    align = 4
    starts, at = [], 0
    for shape in shapes:
        starts.append(at)
        at += -(-torch.Size(shape).numel() // align) * align
    total = -(-at // world) * world
    size = total // world
    torch.manual_seed(0)
    tensors = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    buffer = torch.zeros(total)
    for t, start in zip(tensors, starts, strict=True):
        buffer[start : start + t.numel()] = t.detach().flatten()
    flat = nn.Parameter(buffer[rank * size : (rank + 1) * size].clone())
    layout = FlatLayout(shapes, rank * size, size, starts)
    shards = ShardGroup(None, rank, world)
    optimizer = ShardedMoFO([flat], **OPTIONS)
    optimizer.set_layouts({flat: layout}, shards)
    ref_optimizer = MoFO(tensors, **OPTIONS)
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(step)
        grads = [torch.randn(shape, generator=generator) for shape in shapes]
        grads[0][:, :3] = 0.25  # 21 ties on the threshold of a tensor split over both ranks
        grads[0][0, 3:] = 3.0
        full_grad = torch.zeros(total)
        for g, start in zip(grads, starts, strict=True):
            full_grad[start : start + g.numel()] = g.flatten()
        flat.grad = full_grad[rank * size : (rank + 1) * size].clone()
        for t, g in zip(tensors, grads, strict=True):
            t.grad = g
        optimizer.step()
        ref_optimizer.step()
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat.detach())
        gathered = torch.cat(parts)
        for i, (t, start) in enumerate(zip(tensors, starts, strict=True)):
            got = gathered[start : start + t.numel()].view(t.shape)
            _same(f"zero step {step} tensor {i}", got, t.detach())
    return {"steps": STEPS, "tensors": len(shapes), "partition_size": size}


def deepspeed_zero(stage: int):
    """DeepSpeed ZeRO-``stage`` on CPU/gloo with its real flat partitions, vs one process.

    Both ranks get the same batch, so DeepSpeed's averaged gradient equals the single-process
    gradient bit for bit ((g + g) / 2 = g) and the comparison is exact.
    """

    def run(rank: int, world: int) -> dict:
        import deepspeed

        from forgetless.optim.zero import ZeroLayoutCallback, attach_zero

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(),
                              nn.Linear(7, 3))  # fmt: skip
        reference = copy.deepcopy(model)
        config = {
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,  # clipping rescales by a norm: an extra rounding
        }
        client = ShardedMoFO(model.parameters(), **OPTIONS)
        engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=config)
        if stage == 1:
            assert attach_zero(engine) is client
        else:  # as in `forgetless train`: the callback gets a wrapper (accelerate's holds the
            # ZeRO optimizer as `.optimizer`; the real one needs an Accelerator to exist)
            wrapper = SimpleNamespace(optimizer=engine.optimizer)
            ZeroLayoutCallback().on_train_begin(None, None, None, optimizer=wrapper)
            assert client.layouts
        ref_optimizer = MoFO(reference.parameters(), **OPTIONS)
        moved = 0
        for step in range(STEPS):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
            engine.backward(engine(x).pow(2).sum())
            engine.step()
            reference(x).pow(2).sum().backward()
            ref_optimizer.step()
            ref_optimizer.zero_grad()
            with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
                for i, (p, q) in enumerate(zip(model.parameters(), reference.parameters(),
                                               strict=True)):  # fmt: skip
                    _same(f"ZeRO-{stage} step {step} tensor {i}", p.detach().clone(), q.detach())
            local = torch.tensor(sum(int(client.state[f].get("moved", 0)) for f in client.layouts))
            dist.all_reduce(local)
            want = sum(int(ref_optimizer.state[q]["moved"]) for q in reference.parameters())
            _same(f"ZeRO-{stage} step {step} moved", local, torch.tensor(want))
            moved += want
        flat_sizes = [f.numel() for f in client.layouts]
        return {"steps": STEPS, "moved": moved, "partition_sizes": flat_sizes,
                "optimizer": type(engine.optimizer).__name__}  # fmt: skip

    return run


SCENARIOS = {"ddp": ddp, "fsdp2": fsdp2, "crafted": crafted, "zero": zero,
             **{f"zero{stage}": deepspeed_zero(stage) for stage in (1, 2, 3)}}  # fmt: skip


def _worker(rank: int, scenarios: str, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    summaries = {}
    try:
        for scenario in scenarios.split(","):
            summaries[scenario] = SCENARIOS[scenario](rank, world)
            dist.barrier()
            if rank == 0:
                Path(out).write_text(json.dumps(summaries, indent=2))
    finally:
        dist.destroy_process_group()
    # Leave without Python's finalization, where a gloo thread freeing a collective's tensors
    # aborts the process now and then (docs/distributed.md, "How a launched process exits").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU, communicating with gloo
    name, world_size, master_port, out_path = sys.argv[1:5]
    mp.spawn(_worker, args=(name, int(world_size), int(master_port), out_path),
             nprocs=int(world_size))  # fmt: skip
