"""Gradient accumulation must not change what a step does: the anchor and EWC penalties, the LwF
and KL terms and the DFT loss weigh the same with batch 8 × accum 1 and batch 4 × accum 2."""

import pytest
import torch
from transformers import AutoTokenizer, TrainerCallback

from forgetless.models import resolve_model
from forgetless.train import train
from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


class _MoveThenRecord(TrainerCallback):
    """Moves the trainable weights away from θ₀ before the first step (at θ₀ the anchor and the
    KL have zero gradient) and records the accumulated gradient the optimizer is handed."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.grad is not None}


@pytest.mark.parametrize("method, options", [
    ("l2-anchor", {"anchor_weight": 1.0}),
    ("l1-anchor", {"anchor_weight": 1e-3}),
    ("attn+lwf", {"lwf_weight": 1.0}),
    ("attn+asft", {"kl_weight": 1.0}),  # DFT over the step's tokens + KL on them
    ("attn+kl", {"kl_weight": 1.0, "kl_direction": "reverse"}),
    ("mlp+ewc", {"ewc_lambda": 1.0, "ewc_source": "largest_number", "ewc_samples": 2}),
])
def test_accumulation_leaves_the_step_unchanged(tmp_path, tokenizer, method, options):
    grads = {}
    for batch, accum in ((8, 1), (4, 2)):
        record = _MoveThenRecord()
        train(model=tiny_llama(), tokenizer=tokenizer, method=method, data="count_letters",
              limit=8, batch_size=batch, grad_accum=accum, max_steps=1, max_length=64,
              max_grad_norm=0.0, update_stats_every=None, report_to=[], save_model=False,
              output_dir=str(tmp_path / f"run{accum}"), callbacks=[record], **options)
        grads[accum] = record.grads
    assert grads[1] and grads[1].keys() == grads[2].keys()
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
