"""bfloat16 training and evaluation of every method family on a tiny model (CPU autocast).

``dtype=bfloat16`` loads (here: casts) the weights to bf16; by default the trainable ones train
as float32 master weights under the Trainer's bf16 autocast and return to bf16 at the end, so
the frozen weights, the saved model and the evaluated model are really bf16. With
``fp32_master_weights=false`` every weight, gradient and optimizer moment is bf16 throughout.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

from forgetless.eval import Target, TargetRow, evaluate
from forgetless.eval.scoring import score_requests
from forgetless.monitor import ForgettingMonitor
from forgetless.train import train
from test_eval_helpers import char_tokenizer
from tiny_models import tiny_model

FAMILIES = ["full", "attn", "mlp-gate-up", "lora", "mofo", "l2-anchor"]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def tiny_llama():
    return tiny_model("llama").train()


class _Dtypes(TrainerCallback):
    """Records the dtypes of trainable and frozen weights while the run trains."""

    def __init__(self) -> None:
        self.trainable: set[torch.dtype] = set()
        self.frozen: set[torch.dtype] = set()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for param in model.parameters():
            (self.trainable if param.requires_grad else self.frozen).add(param.dtype)


def _rows():
    return [TargetRow("0", [{"role": "user", "content": "How many r in 'carrot'?"}], "2", "2"),
            TargetRow("1", [{"role": "user", "content": "How many a in 'banana'?"}], "3", "3")]


def _run(tmp_path, tokenizer, method, **overrides):
    dtypes = _Dtypes()
    monitor = ForgettingMonitor(every=2, prompts=["Water boils at", "A cat has four"],
                                action="warn")
    settings = dict(data="count_letters", limit=8, batch_size=4, max_steps=3, max_length=160,
                    method=method, learning_rate=1e-2, dtype="bfloat16", logging_steps=1,
                    report_to=[], save_model=False, output_dir=str(tmp_path / method))
    result = train(model=tiny_llama(), tokenizer=tokenizer, callbacks=[dtypes, monitor],
                   **{**settings, **overrides})
    return result, dtypes, monitor


def _changed(model) -> bool:
    before = dict(tiny_llama().named_parameters())
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return any(not torch.equal(p.float(), before[n].float()) for n, p in
               merged.named_parameters() if n in before)


@pytest.mark.parametrize("method", FAMILIES)
def test_bf16_training_and_evaluation(tmp_path, tokenizer, method):
    result, dtypes, monitor = _run(tmp_path, tokenizer, method)
    losses = [p["loss"] for p in result.metrics["loss_history"]]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert result.metrics["dtype"] == "bfloat16"
    assert dtypes.trainable == {torch.float32}  # master weights ...
    assert dtypes.frozen <= {torch.bfloat16}  # ... beside bf16 frozen ones (none for full)
    assert monitor.history and math.isfinite(monitor.history[-1]["forgetting/kl"])
    model = result.model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # evaluated in bf16
    assert _changed(model)
    base = tiny_llama().to(torch.bfloat16)
    target = Target("bf16_letters", load=_rows, max_new_tokens=4)
    evaluated = evaluate(model, tokenizer, suite=[], target=target, base_model=base,
                         drift_prompts=["Water boils at", "A cat has four"], batch_size=2)
    assert math.isfinite(evaluated.metrics["bf16_letters/answer_nll"].value)
    assert math.isfinite(evaluated.metrics["drift/kl"].value)
    scores = score_requests(model, tokenizer, [("Q: 2+2?\nA:", " 4"), ("Q: 2+2?\nA:", " 5")])
    assert all(math.isfinite(s) for s in scores)


@pytest.mark.parametrize("method", ["full", "mofo"])
def test_pure_bf16_keeps_every_weight_bf16(tmp_path, tokenizer, method):
    result, dtypes, _ = _run(tmp_path, tokenizer, method, fp32_master_weights=False,
                             save_model=True)
    assert dtypes.trainable == {torch.bfloat16} and not dtypes.frozen
    assert all(math.isfinite(p["loss"]) for p in result.metrics["loss_history"])
    assert _changed(result.model)
    assert result.metrics["optimizer_state_bytes"] > 0
    saved = type(result.model).from_pretrained(result.model_dir)
    assert saved.dtype == torch.bfloat16
