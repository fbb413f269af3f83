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
    group = (
        lambda ps: [  # noqa: E731
            {"params": ps[:2], "weight_decay": 0.1},
            {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)},
        ]
    )
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
