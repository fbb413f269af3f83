"""evaluate() end to end on a tiny model: metric names, hand-checked accuracy, zero drift
against itself, JSON round trip, and the CLI's one-line errors."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from forgetless.eval import EvalResult, Target, TargetRow, evaluate, paired_difference
from forgetless.eval.scoring import score_requests
from test_eval_helpers import char_tokenizer
from tiny_models import tiny_model

QUIZ = """
name: quiz
data_files: {test: quiz.jsonl}
id: "key"
text: "Q: {{q}}\\nA:"
choices: "options"
gold: "answer"
"""


@pytest.fixture()
def quiz(tmp_path):
    rows = [{"key": f"k{i}", "q": f"what is {i}?", "options": ["red", "blue sky", "no"],
             "answer": i % 3} for i in range(9)]
    (tmp_path / "quiz.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "quiz.yaml").write_text(QUIZ)
    return str(tmp_path / "quiz.yaml")


def _target():
    rows = [TargetRow(str(i), [{"role": "user", "content": f"{i}+1?"}], f"It is {i + 1}",
                      str(i + 1)) for i in range(3)]
    return Target("plus_one", load=lambda: rows, max_new_tokens=4)


def test_evaluate_metrics_match_hand_computation_and_round_trip(quiz, tmp_path):
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    result = evaluate(model, tokenizer, suite=[quiz], limit=6, seed=1, target=_target(),
                      target_limit=None, base_model=copy.deepcopy(model), batch_size=4)
    assert {"quiz/acc", "quiz/acc_norm", "heldout/acc", "plus_one/exact_match",
            "plus_one/answer_nll", "drift/kl", "drift/top1_agreement", "drift/number_mass",
            "drift/number_mass_base"} <= set(result.metrics)
    records = result.per_item["quiz"]
    assert len(records) == 6 and len({r["id"] for r in records}) == 6
    # Recompute acc / acc_norm by hand from the scorer for the same items.
    correct, correct_norm = [], []
    for r in records:
        i = int(r["id"][1:])
        lls = score_requests(model, tokenizer, [(f"Q: what is {i}?\nA:", f" {o}")
                                                for o in ["red", "blue sky", "no"]])
        correct.append(int(np.argmax(lls)) == i % 3)
        correct_norm.append(int(np.argmax(np.array(lls) / [3, 8, 2])) == i % 3)
    assert result.value("quiz/acc") == pytest.approx(np.mean(correct))
    assert result.value("quiz/acc_norm") == pytest.approx(np.mean(correct_norm))
    assert result.value("heldout/acc") == result.value("quiz/acc")
    assert result.value("drift/kl") == pytest.approx(0.0, abs=1e-7)
    assert result.value("drift/top1_agreement") == 1.0
    assert result.param_drift["total"]["rel_l2"] == 0.0
    assert result.provenance["tasks"]["quiz"]["n"] == 6
    assert len(next(iter(result.provenance["tasks"]["quiz"]["files"].values()))) == 64
    saved = result.save(tmp_path / "out" / "r.json")
    again = EvalResult.load(saved)
    assert again.to_dict() == json.loads(json.dumps(result.to_dict()))
    assert again.metrics["quiz/acc"] == result.metrics["quiz/acc"]
    assert paired_difference(result, again, "quiz").value == 0.0


def _nudged(model):
    """A copy of ``model`` whose output head moved a little: a stand-in for a tuned model."""
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.05 * torch.randn_like(tuned.lm_head.weight))
    return tuned


def test_same_seed_same_items_and_changed_model_drifts(quiz):
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    tuned = _nudged(model)
    a = evaluate(model, tokenizer, suite=[quiz], limit=4, seed=0)
    b = evaluate(tuned, tokenizer, suite=[quiz], limit=4, seed=0, base_model=model)
    assert [r["id"] for r in a.per_item["quiz"]] == [r["id"] for r in b.per_item["quiz"]]
    assert b.value("drift/kl") > 0 and b.param_drift["total"]["changed_frac"] > 0


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "forgetless", "eval", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_malformed_task_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntext: '{{q'\nchoices: 'x'\ndata_files: {test: a.jsonl}\n")
    proc = _cli("--suite", str(bad))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad" in lines[0] and lines[0].startswith("forgetless: error:")


def test_cli_unknown_benchmark_is_a_one_line_error():
    proc = _cli("--suite", "arc_easy,hellaswag_missing")
    assert proc.returncode == 2 and "hellaswag_missing" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.integration
def test_embedded_model_against_itself():
    from forgetless.models import load_model

    model, tokenizer = load_model()
    result = evaluate(model, tokenizer, suite=["arc_easy"], limit=12, base_model=model,
                      drift_prompts=["The capital of France is", "Count: one, two,"])
    assert 0.0 <= result.value("arc_easy/acc") <= 1.0
    assert result.value("drift/kl") == pytest.approx(0.0, abs=1e-6)
    assert result.value("drift/top1_agreement") == 1.0
    assert result.param_drift["total"]["rel_l2"] == 0.0


def test_choice_measures_hand_values():
    from forgetless.eval.evaluator import choice_measures

    lls = np.array([-1.0, -2.0, -4.0])
    logprob, margin = choice_measures(lls, 1)
    assert logprob == pytest.approx(-2.0 - np.log(np.exp(-1) + np.exp(-2) + np.exp(-4)))
    assert margin == pytest.approx(-1.0)
    assert choice_measures(lls, 0)[1] == pytest.approx(1.0)
    # a shift of every choice's log-likelihood changes nothing (normalised over the choices)
    assert choice_measures(lls + 7.0, 1) == pytest.approx((logprob, margin))


def test_gold_logprob_and_margin_per_item_and_paired(quiz):
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    tuned = _nudged(model)
    a = evaluate(model, tokenizer, suite=[quiz], limit=6, seed=0)
    b = evaluate(tuned, tokenizer, suite=[quiz], limit=6, seed=0)
    records = a.per_item["quiz"]
    for r in records:
        lls = np.array(r["loglikelihoods"])
        assert r["gold_logprob"] == pytest.approx(
            lls[r["gold"]] - np.log(np.exp(lls).sum()), abs=1e-4)
        assert (r["margin"] > 0) == bool(r["correct"])
    assert a.value("quiz/gold_logprob") == pytest.approx(
        np.mean([r["gold_logprob"] for r in records]))
    assert a.value("heldout/margin") == a.value("quiz/margin")
    assert "quiz/gold_logprob" in a.table()
    delta = paired_difference(a, b, "quiz", "gold_logprob")
    assert delta.n == 6 and delta.value == pytest.approx(
        b.value("quiz/gold_logprob") - a.value("quiz/gold_logprob"))
    assert delta.value != 0.0


def test_paired_measure_missing_from_an_old_result_says_re_evaluate(quiz):
    from forgetless.errors import ForgetlessError

    model, tokenizer = tiny_model("llama"), char_tokenizer()
    new = evaluate(model, tokenizer, suite=[quiz], limit=3, seed=0)
    old = EvalResult.from_dict(json.loads(json.dumps(new.to_dict())))
    for r in old.per_item["quiz"]:
        del r["margin"]
    with pytest.raises(ForgetlessError, match="older evaluator"):
        paired_difference(old, new, "quiz", "margin")


def test_a_task_given_as_a_path_gets_its_limit_and_exclusions(quiz):
    """``limit`` and ``exclude`` may be keyed by what the user wrote in the suite (a .yaml path,
    as tune and compare pass it) or by the task's name: either way they apply. Keyed by the path
    they used to be ignored, so tune's test sample could repeat validation items."""
    from forgetless.eval import sampled_rows

    model, tokenizer = tiny_model("llama"), char_tokenizer()
    validation = sampled_rows(quiz, 4, 0)
    for key in (quiz, "quiz"):
        result = evaluate(model, tokenizer, suite=[quiz], limit={key: 5}, seed=0,
                          exclude={key: validation}, batch_size=4)
        ids = {int(r["id"][1:]) for r in result.per_item["quiz"]}
        assert len(ids) == 5 and not ids & set(validation), key
