"""The retention gate: the rule itself, a model against itself passes, a damaged model fails."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from forgetless.check import judge
from forgetless.models import resolve_model
from tiny_models import tiny_llama


@pytest.mark.parametrize(
    ("change", "ci_low", "ci_high", "status"),
    [
        (0.0, 0.0, 0.0, "PASS"),       # identical answers
        (-1.5, -4.0, 1.0, "PASS"),     # within the allowed drop
        (-6.0, -12.0, 0.5, "WARN"),    # large but not significant: more items needed
        (-6.0, -10.0, -2.0, "FAIL"),   # large and significant
        (-2.5, -3.0, -2.1, "FAIL"),    # just above the limit, significant
        (3.0, 1.0, 5.0, "PASS"),       # improvement
    ],
)
def test_rule(change, ci_low, ci_high, status):
    assert judge(change, ci_low, ci_high, max_drop=2.0) == status


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "forgetless", "check", *args],
                          capture_output=True, text=True, timeout=1800)


def test_model_against_itself_passes(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(tmp_path)
    run = _cli("--model", str(tmp_path), "--base", str(tmp_path), "--suite", "arc_easy",
               "--limit", "12", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["passed"] and result["rows"][0]["task"] == "arc_easy"
    assert result["rows"][0]["change"] == 0.0 and result["rows"][0]["n"] == 12


def test_bad_max_drop_is_a_usage_error(tmp_path):
    run = _cli("--model", "x", "--base", "x", "--max-drop", "-1")
    assert run.returncode == 2 and "--max-drop must be >= 0" in run.stderr


@pytest.mark.integration
def test_damaged_embedded_model_fails(tmp_path):
    from forgetless.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator) * param.std() * 2.0
            param.add_(noise)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    # PIQA: the base is far enough above chance (50%) for a destroyed model to drop
    # significantly on 120 paired items (ARC-Easy's 4-choice margin is too small for that).
    run = _cli("--model", str(tmp_path), "--base", "smollm2-135m", "--suite", "piqa",
               "--limit", "120")
    print(run.stdout)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL" in run.stdout.splitlines()[1]


def _result(task, logprobs, correct):
    from forgetless.eval import EvalResult
    from forgetless.eval.stats import proportion_metric

    records = [{"id": str(i), "correct": c, "gold_logprob": lp, "margin": lp}
               for i, (lp, c) in enumerate(zip(logprobs, correct))]
    return EvalResult(metrics={f"{task}/acc": proportion_metric(correct)},
                      per_item={task: records})


def test_logprob_gate_catches_a_drop_accuracy_cannot_see():
    from forgetless.check import judge_results

    # Same answers (accuracy unchanged), but every gold choice lost 0.3-0.5 nats of confidence.
    base = _result("quiz", [-0.5 - 0.01 * i for i in range(40)], [1] * 30 + [0] * 10)
    tuned = _result("quiz", [-0.9 - 0.01 * i + 0.1 * (i % 3) for i in range(40)],
                    [1] * 30 + [0] * 10)
    plain = judge_results(base, tuned, ["quiz"], max_drop=2.0)
    assert plain.passed and plain.rows[0].change == 0.0
    assert plain.rows[0].logprob_change < -0.2 and plain.rows[0].logprob_ci_high < 0
    gated = judge_results(base, tuned, ["quiz"], max_drop=2.0, max_logprob_drop=0.1)
    assert not gated.passed and gated.rows[0].status == "FAIL"
    assert "Δ logp" in gated.table() and gated.to_dict()["max_logprob_drop"] == 0.1
    assert judge_results(base, tuned, ["quiz"], 2.0, max_logprob_drop=1.0).passed


def test_in_memory_check_reports_the_logprob_change(tmp_path):
    from forgetless.check import check
    from test_eval_helpers import char_tokenizer
    from tiny_models import tiny_model

    rows = [{"key": f"k{i}", "q": f"what is {i}?", "options": ["red", "blue", "no"],
             "answer": i % 3} for i in range(8)]
    (tmp_path / "quiz.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "quiz.yaml").write_text(
        'name: quiz\ndata_files: {test: quiz.jsonl}\nid: "key"\ntext: "Q: {{q}}\\nA:"\n'
        'choices: "options"\ngold: "answer"\n')
    model = tiny_model("llama")
    result = check(model, model, char_tokenizer(), suite=[str(tmp_path / "quiz.yaml")],
                   limit=8, device="cpu", dtype="float32", max_logprob_drop=0.0)
    assert result.passed and result.rows[0].logprob_change == 0.0 and result.rows[0].n == 8


def test_bad_max_logprob_drop_is_a_usage_error():
    run = _cli("--model", "x", "--base", "x", "--max-logprob-drop", "-1")
    assert run.returncode == 2 and "--max-logprob-drop must be >= 0" in run.stderr
