"""Fine-tune the embedded SmolLM2-135M briefly with each method: loss falls, frozen stays frozen."""

import pytest
import torch

from forgetless.models import load_model
from forgetless.train import train

pytestmark = pytest.mark.integration

METHODS = ["full", "lora", "attn", "attn-qkv", "mlp", "mlp-gate-up", "l2-anchor", "mofo"]


@pytest.fixture(scope="module")
def base():
    model, tokenizer = load_model("smollm2-135m")
    return {k: v.clone() for k, v in model.state_dict().items()}, tokenizer


@pytest.mark.parametrize("method", METHODS)
def test_loss_falls_and_frozen_weights_are_bit_identical(tmp_path, base, method):
    state, tokenizer = base
    model, _ = load_model("smollm2-135m")
    result = train(model=model, tokenizer=tokenizer, method=method, data="count_letters",
                   limit=4, batch_size=4, max_steps=5, max_length=64, learning_rate=1e-4,
                   logging_steps=1, report_to=[], save_model=False, fraction=0.1,
                   output_dir=str(tmp_path / method))
    assert result.metrics["last_loss"] < 0.8 * result.metrics["first_loss"], result.loss_history
    tuned = result.model
    if method == "lora":
        tuned = tuned.merge_and_unload()
    changed = {n for n, v in tuned.state_dict().items() if not torch.equal(v, state[n])}
    if method == "mlp-gate-up":
        assert changed and all("gate_proj" in n or "up_proj" in n for n in changed), changed
    if method in {"attn", "attn-qkv"}:
        assert changed and all("self_attn" in n for n in changed), changed
        if method == "attn-qkv":
            assert not any("o_proj" in n for n in changed)
    assert changed, "nothing trained"


def test_mofo_moves_about_fraction_of_each_matrix_per_step(base):
    """With fraction=0.1, each >=2-D tensor changes in ~10% of its coordinates per step.

    Tolerance: MoFO's fast threshold lands within 0.2% of k (``forgetless.optim.mofo.TOLERANCE``);
    a tensor with fewer non-zero-momentum coordinates than k (the embedding: most vocabulary rows
    get no gradient) moves only those, so it is bounded above, not pinned.
    """
    from forgetless.data import build_dataset
    from forgetless.methods import MethodOptions, prepare_model
    from forgetless.optim.mofo import TOLERANCE

    _, tokenizer = base
    model, _ = load_model("smollm2-135m")
    prepared = prepare_model(model, "mofo", MethodOptions(fraction=0.1))
    optimizer = prepared.make_optimizer(lr=1e-4, weight_decay=0.0)
    rows = build_dataset(tokenizer, "count_letters", max_length=64, limit=4)
    batch = {k: torch.tensor(rows[k]) for k in ("input_ids", "labels", "attention_mask")}
    matrices = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    for _step in range(2):
        before = {n: p.detach().clone() for n, p in matrices.items()}
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        for name, param in matrices.items():
            share = (param.detach() != before[name]).float().mean().item()
            if "embed_tokens" in name:
                assert 0 < share <= 0.1 * (1 + TOLERANCE) + 1e-6, (name, share)
            else:
                assert abs(share - 0.1) <= 0.1 * TOLERANCE + 1e-4, (name, share)
