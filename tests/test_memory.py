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
