"""MoFO semantics against a small reference written here, and AdamW equivalence at fraction=1."""

from __future__ import annotations

import io

import pytest
import torch

from forgetless import MoFO


def _params(seed: int = 0, shapes=((8, 16), (16,), (4, 3, 5))) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]


def _set_grads(params, step: int) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def _reference_step(
    params, state, step, lr, betas, eps, wd, fraction, decay_frozen=False, filter_name="momentum"
):
    """Dense Adam moments; top-k by |m| (or |g|) moves; decay only the moved coordinates."""
    beta1, beta2 = betas
    for i, p in enumerate(params):
        m, v = state.setdefault(i, (torch.zeros_like(p), torch.zeros_like(p)))
        g = p.grad
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).add_(g * g, alpha=1 - beta2)
        update = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
        mask = torch.ones_like(p, dtype=torch.bool)
        if p.dim() >= 2:
            k = max(1, round(fraction * p.numel()))
            score = (m if filter_name == "momentum" else g).abs().flatten()
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[torch.topk(score, k).indices] = True
            mask = mask.view(p.shape)
        decay_mask = torch.ones_like(mask) if decay_frozen else mask
        with torch.no_grad():
            p.sub_(lr * wd * p * decay_mask)
            p.sub_(lr * update * mask)


@pytest.mark.parametrize("decay_frozen", [False, True])
@pytest.mark.parametrize("filter_name", ["momentum", "gradient"])
def test_matches_reference(decay_frozen, filter_name):
    ours, ref = _params(), _params()
    opt = MoFO(
        ours, lr=1e-2, weight_decay=0.1, fraction=0.2, decay_frozen=decay_frozen, filter=filter_name
    )
    ref_state = {}
    for step in range(1, 6):
        _set_grads(ours, step)
        _set_grads(ref, step)
        opt.step()
        _reference_step(
            ref,
            ref_state,
            step,
            1e-2,
            (0.9, 0.999),
            1e-8,
            0.1,
            0.2,
            decay_frozen=decay_frozen,
            filter_name=filter_name,
        )
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_only_top_fraction_moves_and_one_d_moves_fully():
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = MoFO(params, lr=1e-2, fraction=0.1, weight_decay=0.1)
    _set_grads(params, 0)
    opt.step()
    for p, b in zip(params, before, strict=True):
        changed = int((p != b).sum())
        expected = p.numel() if p.dim() == 1 else max(1, round(0.1 * p.numel()))
        assert changed == expected


def test_filter_1d_filters_vectors():
    params = _params()
    before = params[1].detach().clone()
    opt = MoFO(params, lr=1e-2, fraction=0.25, filter_1d=True)
    _set_grads(params, 0)
    opt.step()
    assert int((params[1] != before).sum()) == 4


def test_random_filter_moves_k_and_is_seeded():
    runs = []
    for _ in range(2):
        params = _params()
        opt = MoFO(params, lr=1e-2, fraction=0.3, filter="random", seed=7)
        _set_grads(params, 0)
        opt.step()
        runs.append(params[0].detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert int((runs[0] != _params()[0]).sum()) == round(0.3 * 128)


def test_fraction_one_is_adamw_with_groups_and_decay():
    ours, theirs = _params(3), _params(3)

    def group(ps):
        return [
            {"params": ps[:2], "weight_decay": 0.1},
            {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)},
        ]

    opt = MoFO(group(ours), lr=1e-2, fraction=1.0)
    ref = torch.optim.AdamW(group(theirs), lr=1e-2, foreach=False)
    for step in range(8):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_state_dict_round_trip_continues_identically():
    params = _params()
    opt = MoFO(params, lr=1e-2, fraction=0.2, weight_decay=0.1)
    for step in range(3):
        _set_grads(params, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    clones = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    resumed = MoFO(clones, lr=1.0, fraction=0.5)
    resumed.load_state_dict(saved["opt"])
    assert set(resumed.state[clones[0]]) >= {"step", "exp_avg", "exp_avg_sq"}
    for step in range(3, 6):
        _set_grads(params, step)
        _set_grads(clones, step)
        opt.step()
        resumed.step()
    for a, b in zip(params, clones, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_params_without_grad_and_tiny_tensors():
    params = _params(shapes=((2, 2), (3, 1), (5, 5)))
    params[2].grad = None
    opt = MoFO(params[:2], lr=1e-2, fraction=0.05, track_masks=True)
    _set_grads(params[:2], 0)
    frozen = params[2].detach().clone()
    opt.step()
    assert [int(opt.state[p]["moved"]) for p in params[:2]] == [1, 1]
    assert torch.equal(params[2], frozen)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"filter": "magnitude"}, "unknown filter"),
        ({"lr": -1.0}, "learning rate"),
        ({"betas": (1.0, 0.9)}, "betas"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoFO(_params(), **kwargs)


# --- the count-based selection, both backends -------------------------------------------------

KERNEL = pytest.param(
    "kernel",
    marks=pytest.mark.skipif(
        __import__("forgetless.optim.kernel", fromlist=["library"]).library() is None,
        reason="MoFO C kernel unavailable (no C compiler)",
    ),
)
BACKENDS = [KERNEL, "torch"]
BIG = ((120, 100), (64,), (7, 9), (200, 150))  # two tensors larger than the 2048-key sample


def _run(backend, steps=3, shapes=BIG, grads=None, **kwargs):
    params = _params(shapes=shapes)
    opt = MoFO(params, lr=1e-2, weight_decay=0.1, backend=backend, track_masks=True, **kwargs)
    moved = []
    for step in range(steps):
        _set_grads(params, step) if grads is None else grads(params, step)
        opt.step()
        moved.append([int(opt.state[p]["moved"]) for p in params])
    return params, opt, moved


@pytest.mark.parametrize("filter_name", ["momentum", "gradient", "random"])
@pytest.mark.parametrize("exact", [True, False])
def test_kernel_matches_torch_path(filter_name, exact):
    if __import__("forgetless.optim.kernel", fromlist=["x"]).library() is None:
        pytest.skip("MoFO C kernel unavailable")
    a, _, moved_a = _run("kernel", filter=filter_name, exact=exact, decay_frozen=exact)
    b, _, moved_b = _run("torch", filter=filter_name, exact=exact, decay_frozen=exact)
    assert moved_a == moved_b
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("filter_name", ["momentum", "gradient", "random"])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_tensor_by_tensor_equals_batched_passes(monkeypatch, filter_name, exact, threads):
    """Cache-sized tensors take the whole step one by one; the result must be bit-identical to
    the batched passes (which sharded optimizers use), whatever the thread split."""
    kernel = pytest.importorskip("forgetless.optim.kernel")
    if kernel.library() is None:
        pytest.skip("MoFO C kernel unavailable")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    settings = dict(filter=filter_name, exact=exact, decay_frozen=not exact)
    monkeypatch.setattr(kernel, "CACHE_ELEMENTS", 1 << 20)
    one_by_one, _, moved_a = _run("kernel", steps=4, **settings)
    monkeypatch.setattr(kernel, "CACHE_ELEMENTS", 0)
    passes, _, moved_b = _run("kernel", steps=4, **settings)
    assert moved_a == moved_b
    assert all(torch.equal(x, y) for x, y in zip(one_by_one, passes, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_mode_moves_exactly_the_topk_set(backend):
    params, opt, moved = _run(backend, steps=2, exact=True, fraction=0.07)
    before = [p.detach().clone() for p in params]
    _set_grads(params, 99)
    opt.step()
    for p, b in zip(params, before, strict=True):
        if p.dim() < 2:
            continue
        k = max(1, round(0.07 * p.numel()))
        expected = torch.zeros(p.numel(), dtype=torch.bool)
        expected[torch.topk(opt.state[p]["exp_avg"].abs().flatten(), k).indices] = True
        assert torch.equal((p != b).flatten(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exact", [True, False])
def test_achieved_fraction_within_tolerance(backend, exact):
    _, _, moved = _run(backend, steps=4, fraction=0.1, exact=exact)
    for step in moved:
        for count, shape in zip(step, BIG, strict=True):
            numel = torch.Size(shape).numel()
            k = numel if len(shape) == 1 else max(1, round(0.1 * numel))
            assert abs(count - k) <= (0 if exact else 0.002 * k + 1)


def _tied_grads(params, step):
    """Gradients of a few distinct values, and whole zero rows: |m| is full of exact ties."""
    generator = torch.Generator().manual_seed(step)
    for p in params:
        grad = torch.randint(-2, 3, p.shape, generator=generator).float()
        if p.dim() == 2:
            grad[: p.shape[0] // 2] = 0.0
        p.grad = grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fraction", [0.1, 0.7])
def test_ties_do_not_inflate_the_count(backend, fraction):
    _, _, moved = _run(backend, steps=3, grads=_tied_grads, fraction=fraction)
    for step in moved:
        for count, shape in zip(step, BIG, strict=True):
            numel = torch.Size(shape).numel()
            k = numel if len(shape) == 1 else max(1, round(fraction * numel))
            assert abs(count - k) <= 0.002 * k + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_momentum_moves_and_decays_exactly_k(backend):
    params = _params(shapes=((40, 50),))
    before = params[0].detach().clone()
    opt = MoFO(params, lr=0.1, weight_decay=0.5, fraction=0.1, backend=backend, exact=True)
    params[0].grad = torch.zeros_like(params[0])
    opt.step()
    changed = (params[0] != before).flatten()
    assert int(changed.sum()) == 200
    assert bool(changed[:200].all())  # ties go to the lowest flat indices


def test_torch_backend_is_bitwise_adamw_at_fraction_one():
    ours, theirs = _params(5), _params(5)
    opt = MoFO(ours, lr=1e-2, weight_decay=0.1, fraction=1.0, backend="torch")
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(5):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_run_with_fast_selection(backend):
    params, opt, _ = _run(backend, steps=2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = MoFO(clones, backend=backend)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(2, 4):
        _set_grads(params, step)
        _set_grads(clones, step)
        opt.step()
        resumed.step()
    for a, b in zip(params, clones, strict=True):
        assert torch.equal(a, b)


class _ThreadSum:
    """count_reduce for two 'ranks' running in two threads: the elementwise sum of both."""

    def __init__(self):
        import threading

        self.barrier = threading.Barrier(2)
        self.slots = [None, None]

    def reducer(self, rank):
        def reduce(counts):
            self.slots[rank] = counts.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()
            return total

        return reduce


@pytest.mark.parametrize("backend", BACKENDS)
def test_count_reduce_gives_shards_the_global_threshold(backend):
    """Two shards of one tensor, stepped in two threads that sum counts, move exactly the
    coordinates a single optimizer moves on the whole tensor (exact mode)."""
    from concurrent.futures import ThreadPoolExecutor

    whole = _params(shapes=((200, 50),))
    shards = [
        torch.nn.Parameter(whole[0].detach()[i * 100 : (i + 1) * 100].clone()) for i in (0, 1)
    ]
    total = _ThreadSum()
    kwargs = dict(lr=1e-2, weight_decay=0.1, fraction=0.1, exact=True, backend=backend)
    single = MoFO(whole, **kwargs)
    parts = [MoFO([s], count_reduce=total.reducer(i), **kwargs) for i, s in enumerate(shards)]
    for step in range(3):
        _set_grads(whole, step)
        for i, shard in enumerate(shards):
            shard.grad = whole[0].grad[i * 100 : (i + 1) * 100].clone()
        single.step()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda opt: opt.step(), parts))
        torch.testing.assert_close(torch.cat([s.detach() for s in shards]), whole[0].detach(),
                                   rtol=0, atol=0)  # fmt: skip
