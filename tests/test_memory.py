"""Memory and host-sync promises of the training step (issue 23): what autograd keeps alive
for the anchor penalty and the LwF term, and what the training loop makes the host wait for."""

from __future__ import annotations

import pytest
import torch

from forgetless.methods import prepare_model
from tiny_models import tiny_model


def _saved_storages(fn):
    """Run ``fn`` under saved-tensor hooks; return its result and the storages autograd kept
    for the backward pass (data pointer and bytes of each saved tensor)."""
    saved = []

    def pack(tensor):
        saved.append((tensor.untyped_storage().data_ptr(), tensor.numel() * tensor.element_size()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, saved


@pytest.mark.parametrize("norm", [2, 1])
def test_anchor_penalty_keeps_no_full_size_temporary(norm):
    """Autograd saves only θ and θ₀ (which exist anyway), never a difference: ``(θ − θ₀).pow(2)``
    kept a full-size copy of every trainable tensor from forward to backward."""
    model = tiny_model("llama")
    prepared = prepare_model(model, f"l{norm}-anchor")
    penalty = prepared.regularizer
    with torch.no_grad():
        for param in penalty.params:
            param.add_(torch.randn_like(param) * 1e-2)
    held = {t.untyped_storage().data_ptr() for t in [*penalty.params, *penalty.anchors]}
    total, saved = _saved_storages(lambda: penalty(model))
    extra = [size for ptr, size in saved if ptr not in held and size > 64]
    assert saved and not extra, f"{len(extra)} temporaries saved, {sum(extra)} bytes"
    total.backward()
    for param, anchor in zip(penalty.params, penalty.anchors, strict=True):
        diff = param.detach() - anchor
        expected = 2 * diff if norm == 2 else diff.sign()
        torch.testing.assert_close(param.grad, penalty.weight * expected)
    expected = sum((p.detach() - a).pow(2).sum() if norm == 2 else (p.detach() - a).abs().sum()
                   for p, a in zip(penalty.params, penalty.anchors, strict=True))
    torch.testing.assert_close(total.detach(), penalty.weight * expected)


@pytest.mark.parametrize("method", ["full", "attn", "lora", "l2-anchor", "full+lwf"])
def test_adamw_methods_take_fused_adamw_on_cuda(method):
    """On CUDA every AdamW method gets fused AdamW (its CUDA tensors faked by FakeTensorMode: no
    GPU needed); on the CPU torch's own default (the single-tensor loop) stays."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    prepared = prepare_model(tiny_model("llama"), method)
    cpu = prepared.make_optimizer(lr=1e-3)
    assert not cpu.defaults["fused"] and not cpu.defaults["foreach"]
    with FakeTensorMode():
        prepared.model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cuda"))
        optimizer = prepared.make_optimizer(lr=1e-3, weight_decay=0.1)
    devices = {p.device.type for group in optimizer.param_groups for p in group["params"]}
    assert devices == {"cuda"} and optimizer.defaults["fused"] is True


def test_adamw_falls_back_to_foreach_where_fused_has_no_kernel(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from forgetless.methods import prepare as module

    real = torch.optim.AdamW

    def no_fused(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point")
        return real(*args, **kwargs)

    monkeypatch.setattr(module.torch.optim, "AdamW", no_fused)
    with FakeTensorMode():
        param = torch.nn.Parameter(torch.empty(4, 4, device="cuda"))
        optimizer = module.adamw([{"params": [param]}], lr=1e-3)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
