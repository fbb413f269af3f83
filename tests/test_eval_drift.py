"""Output and parameter drift, with values checkable by hand."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from forgetless.errors import ForgetlessError
from forgetless.eval import kl_and_number_mass, number_token_ids, param_drift
from forgetless.eval.drift import is_number_piece
from test_eval_helpers import char_tokenizer
from tiny_models import tiny_model

PROMPTS = ["Question: how many legs?\nAnswer:", "The sky is", "A much longer prompt " * 3]


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are the same vector at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("row", logits)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1).clone())


def test_number_token_ids_are_exactly_the_digits_for_a_char_tokenizer():
    tokenizer = char_tokenizer()
    assert [tokenizer.decode([i]) for i in number_token_ids(tokenizer)] == list("0123456789")


@pytest.mark.parametrize(
    "piece,expected",
    [(" 42", True), ("7", True), ("3rd", True), (" Seven", True), ("twenty", True),
     ("first", True), ("hello", False), ("", False), ("4x", False), (" ", False)],
)
def test_number_pieces(piece, expected):
    assert is_number_piece(piece) is expected


def test_identical_models_have_zero_kl_full_agreement_and_equal_mass():
    tokenizer = char_tokenizer()
    model = tiny_model("llama")
    drift = kl_and_number_mass(model, copy.deepcopy(model), tokenizer, PROMPTS, batch_size=2)
    assert drift["kl"].value == pytest.approx(0.0, abs=1e-7)
    assert drift["top1_agreement"].value == 1.0
    assert drift["number_mass"].value == pytest.approx(drift["number_mass_base"].value)
    assert drift["kl"].n == len(PROMPTS)


def test_kl_agreement_and_number_mass_hand_values():
    tokenizer = char_tokenizer()
    vocab = 128
    digit = number_token_ids(tokenizer)[3]
    base = FixedLogits(torch.zeros(vocab))  # uniform: p = 1/V everywhere
    tuned_logits = torch.zeros(vocab)
    tuned_logits[digit] = math.log(3.0)  # that digit gets 3/(V+2), every other token 1/(V+2)
    tuned = FixedLogits(tuned_logits)
    drift = kl_and_number_mass(tuned, base, tokenizer, PROMPTS)
    v = vocab
    kl = (1 / v) * math.log((v + 2) / (3 * v)) + (v - 1) / v * math.log((v + 2) / v)
    assert drift["kl"].value == pytest.approx(kl, rel=1e-4)  # fp32 log-probs
    assert drift["top1_agreement"].value == 0.0  # base argmax is token 0, tuned's the digit
    assert drift["number_mass_base"].value == pytest.approx(10 / v, rel=1e-5)
    assert drift["number_mass"].value == pytest.approx(12 / (v + 2), rel=1e-5)
    change = drift["number_mass_change"]  # paired per prompt
    assert change.value == pytest.approx(12 / (v + 2) - 10 / v, rel=1e-4)
    assert change.stderr == pytest.approx(0.0, abs=1e-6)  # the same change on every prompt


def test_param_drift_zero_for_identical_models():
    model = tiny_model("llama")
    drift = param_drift(model, copy.deepcopy(model))
    assert drift.total["rel_l2"] == 0.0 and drift.total["changed_frac"] == 0.0
    assert all(row["rel_l2"] == 0.0 for row in drift.rows)


def test_param_drift_one_changed_coordinate_by_layer_and_type():
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    weight = model.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        weight[0, 0] += 0.5
    drift = param_drift(model, base)
    w0 = base.model.layers[1].self_attn.q_proj.weight.detach()
    layer_numel = sum(p.numel() for p in base.model.layers[1].parameters())
    layer_params = list(base.model.layers[1].parameters())
    layer_norm = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in layer_params))
    row = next(r for r in drift.rows if r["name"] == "model.layers.1.self_attn.q_proj.weight")
    assert row["rel_l2"] == pytest.approx(0.5 / float(w0.norm()), rel=1e-4)
    assert row["changed_frac"] == pytest.approx(1 / w0.numel())
    assert drift.by_layer["1"]["changed_frac"] == pytest.approx(1 / layer_numel)
    assert drift.by_layer["1"]["rel_l2"] == pytest.approx(0.5 / layer_norm, rel=1e-4)
    assert drift.by_layer["0"]["rel_l2"] == 0.0
    assert drift.by_type["self_attn.q_proj"]["changed_frac"] == pytest.approx(
        1 / (2 * w0.numel())
    )
    assert drift.by_type["mlp.up_proj"]["changed_frac"] == 0.0


def test_param_drift_refuses_mismatched_shapes():
    resized = tiny_model("llama")
    resized.resize_token_embeddings(100)
    with pytest.raises(ForgetlessError, match="shape"):
        param_drift(resized, tiny_model("llama"))
