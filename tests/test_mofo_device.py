"""MoFO's torch path on a (simulated) device: it selects what the kernel selects, and it hands
only count vectors to the host, in a bounded number of synchronisations per parameter group.

The device is simulated (``forgetless.optim.devicecheck``): CPU tensors that claim the ``meta``
device, so the code takes its accelerator branch while the arithmetic runs for real. A
``.cpu()``/``.item()`` of anything, a blocking host-to-device copy, a ``nonzero`` or boolean
index, or an op mixing a CPU tensor with the parameters' device is counted (or raises, for
``.numpy()``/``.tolist()``), so these tests fail on the old path that copied every tensor's keys
to the host several times per step.
"""

from __future__ import annotations

import pytest
import torch

from forgetless import MoFO
from forgetless.optim import kernel, portable, select
from forgetless.optim.devicecheck import HostTraffic, on_device, unwrap

HAS_KERNEL = kernel.library() is not None
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="MoFO C kernel unavailable")

# odd sizes, a prime, a 3-D tensor, a vector and two tensors larger than the 2048-key sample
SHAPES = ((127, 61), (64,), (7, 9), (211, 150), (5, 13, 17), (1, 1), (3001,))


def _params(shapes, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in shapes]


def _grads(shapes, step, tied=False, dtype=torch.float32):
    """Random gradients, or gradients of a few non-zero values (|m| then full of exact ties)."""
    generator = torch.Generator().manual_seed(1000 + step)
    out = []
    for shape in shapes:
        if tied:
            grad = torch.randint(1, 3, shape, generator=generator).float()
            grad *= torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
        else:
            grad = torch.randn(shape, generator=generator)
        out.append(grad.to(dtype))
    return out


def _run(params, grads_of, steps, simulate=False, traffic=None, zero=False, **kwargs):
    """Step MoFO; per step the flat masks of coordinates that changed and the moved counts.
    ``zero``: parameters set to 0 before each step, so every moved coordinate changes even
    where a half-precision update would round away against a weight of order 1."""
    opt_params = [on_device(p) for p in params] if simulate else params
    opt = MoFO(opt_params, track_masks=True, **kwargs)
    history = []
    for step in range(steps):
        for p, g in zip(opt_params, grads_of(step), strict=True):
            p.grad = on_device(g) if simulate else g
            if zero:
                unwrap(p).detach().zero_()
        before = [unwrap(p).detach().clone() for p in opt_params]
        if traffic is not None:
            with traffic:
                opt.step()
        else:
            opt.step()
        changed = [(unwrap(p) != b).flatten() for p, b in zip(opt_params, before, strict=True)]
        moved = [int(unwrap(opt.state[p]["moved"])) for p in opt_params]
        history.append((changed, moved))
    return history


def _simulated_run(params, grads_of, steps, **kwargs):
    with HostTraffic(simulate=True) as traffic:  # the mode must be on while tensors are built
        traffic.reset()
        return _run(params, grads_of, steps, simulate=True, **kwargs), traffic


@needs_kernel
@pytest.mark.parametrize("filter_name", ["momentum", "gradient", "random"])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_device_path_selects_what_the_kernel_selects(monkeypatch, filter_name, exact, tied):
    """Same moved coordinates, step after step, with pieces cut at odd places (CHUNK 777)."""
    monkeypatch.setattr(portable, "CHUNK", 777)
    settings = dict(lr=0.05, weight_decay=0.1, fraction=0.13, filter=filter_name, exact=exact,
                    decay_frozen=exact)  # fmt: skip

    def grads(step):
        return _grads(SHAPES, step, tied)

    on_kernel = _run(_params(SHAPES), grads, 3, backend="kernel", **settings)
    on_device_, traffic = _simulated_run(_params(SHAPES), grads, 3, backend="auto", **settings)
    for (mask_k, moved_k), (mask_d, moved_d) in zip(on_kernel, on_device_, strict=True):
        assert moved_k == moved_d
        for a, b in zip(mask_k, mask_d, strict=True):
            assert torch.equal(a, b)
    assert not traffic.mixed


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_half_precision_selects_what_the_kernel_selects_on_the_same_keys(dtype, exact, tied):
    """beta1 = 0 makes the new momentum the gradient itself, so the half-precision run on the
    device path and a float32 kernel run on the same (upcast) gradients rank identical keys."""
    settings = dict(lr=0.5, weight_decay=0.0, betas=(0.0, 0.999), fraction=0.2, exact=exact,
                    zero=True)  # fmt: skip
    half = _simulated_run(_params(SHAPES, dtype=dtype), lambda s: _grads(SHAPES, s, tied, dtype),
                          2, **settings)[0]  # fmt: skip
    full = _run(_params(SHAPES), lambda s: [g.float() for g in _grads(SHAPES, s, tied, dtype)],
                2, backend="kernel", **settings)  # fmt: skip
    for (mask_h, moved_h), (mask_f, moved_f) in zip(half, full, strict=True):
        assert moved_h == moved_f
        for a, b in zip(mask_h, mask_f, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_state_and_fraction_one_match_adamw(dtype):
    """State is kept as torch AdamW keeps it for that dtype, and fraction 1 is AdamW bit for bit."""
    ours, theirs = _params(SHAPES, 3, dtype), _params(SHAPES, 3, dtype)
    opt = MoFO(ours, lr=1e-2, weight_decay=0.1, fraction=1.0)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(4):
        for a, b, g in zip(ours, theirs, _grads(SHAPES, step, dtype=dtype), strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs, strict=True):  # float16 can overflow: NaN where AdamW has NaN
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[a][key].dtype == ref.state[b][key].dtype == dtype
            torch.testing.assert_close(opt.state[a][key], ref.state[b][key], rtol=0, atol=0)


def _big_shapes(tensors: int) -> list[tuple[int, ...]]:
    """Tensors large enough that a full copy of one dwarfs the count vectors of all of them."""
    return [(600 + 7 * i, 500) for i in range(tensors)] + [(500,)]


@pytest.mark.parametrize("exact", [False, True])
def test_host_gets_count_vectors_only(monkeypatch, exact):
    """Elements handed to the host per step are O(tensors x bins), a small share of the
    parameters; the old path handed over ~3x the parameter count (full key arrays)."""
    monkeypatch.setattr(portable, "CHUNK", 1 << 16)  # several pieces per tensor
    shapes = _big_shapes(6)
    numel = sum(torch.Size(s).numel() for s in shapes)
    traffic = HostTraffic(simulate=True)
    with traffic:
        params = [on_device(p) for p in _params(shapes)]
        opt = MoFO(params, lr=1e-3, fraction=0.1, exact=exact, backend="auto")
        for step in range(3):
            for p, g in zip(params, _grads(shapes, step), strict=True):
                p.grad = on_device(g)
            traffic.reset()
            opt.step()
            passes = 3 + select.MAX_PASSES  # bracket, moments, refinements, masked step
            assert traffic.to_host <= passes * len(shapes) * (select.BINS + 2), traffic.events
            assert traffic.to_host <= 0.02 * numel, (traffic.to_host, numel)
            assert not traffic.mixed, traffic.mixed


def test_host_syncs_are_bounded_per_group_not_per_tensor():
    """Synchronisations per step stay under a constant per parameter group, whether a group
    holds 3 or 30 tensors (a per-tensor .cpu() would grow with the tensors)."""
    bound = 3 + select.MAX_PASSES  # per group and device: bracket, moments, refinements, update
    for tensors in (3, 30):
        shapes = [(40 + i, 30) for i in range(tensors)] + [(30,)]
        params = _params(shapes)
        traffic = HostTraffic(simulate=True)
        with traffic:
            wrapped = [on_device(p) for p in params]
            groups = [{"params": wrapped[::2]}, {"params": wrapped[1::2], "exact": True}]
            opt = MoFO(groups, lr=1e-3, fraction=0.1, backend="auto")
            for step in range(3):
                for p, g in zip(wrapped, _grads(shapes, step), strict=True):
                    p.grad = on_device(g)
                traffic.reset()
                opt.step()
                assert traffic.syncs <= len(groups) * bound, (tensors, traffic.events)
                assert set(traffic.events) <= {"device_to_host"}, traffic.events
                assert not traffic.mixed, traffic.mixed


def test_track_masks_state_and_ties_on_the_device():
    """All-zero momentum: every key ties, the lowest indices move, and the state that
    ``track_masks`` stores lives where the step's counts were read (the host)."""
    with HostTraffic(simulate=True) as traffic:
        (p,) = [on_device(q) for q in _params(((40, 50),))]
        before = unwrap(p).clone()
        opt = MoFO([p], lr=0.1, weight_decay=0.5, fraction=0.1, exact=True, track_masks=True)
        p.grad = on_device(torch.zeros(40, 50))
        opt.step()
    changed = (unwrap(p) != before).flatten()
    assert int(changed.sum()) == 200 == int(opt.state[p]["moved"])
    assert bool(changed[:200].all())
    assert opt.state[p]["exp_avg"].device == p.device  # moments stay with the parameter
    assert not traffic.mixed


def test_simulated_device_catches_a_host_copy():
    """The guard itself: a step that copies a tensor to the host is counted in full."""
    with HostTraffic(simulate=True) as traffic:
        x = on_device(torch.randn(100, 10))
        (x.abs() > 0.5).cpu()
        bool((x > 0).any())
        x[x > 0]
    assert traffic.to_host == 1000 + 1
    assert traffic.events == {"device_to_host": 1, "item": 1, "boolean_index": 1}
