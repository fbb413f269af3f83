"""``compare`` with files where names usually go: a held-out task as a ``.yaml`` path in
``eval.suite`` and the target as a ``.jsonl`` path. The report, the plots and MLflow key them by
the task's name (or a valid MLflow name), not by a path string."""

import json

import pytest
from mlflow.tracking import MlflowClient

from forgetless.compare import compare
from forgetless.errors import ForgetlessError

QUIZ = """
name: quiz
data_files: {test: quiz.jsonl}
text: "Q: {{q}}\\nA:"
choices: "options"
gold: "answer"
"""


def test_task_yaml_and_target_file_paths(tmp_path, model_dir):
    rows = [{"q": f"q{i}", "options": ["x", "y", "z"], "answer": i % 3} for i in range(4)]
    (tmp_path / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "quiz.yaml").write_text(QUIZ)
    target = tmp_path / "sums.jsonl"
    target.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n"
                              for i in range(3)))
    config = {
        "train": dict(model=str(model_dir), data=str(target), limit=4, batch_size=2,
                      max_steps=1, max_length=96, report_to=[]),
        "methods": ["attn"],
        "eval": dict(suite=[str(tmp_path / "quiz.yaml")], limit=4, target=str(target),
                     target_limit=2, batch_size=4, drift_prompts=2),
        "output_dir": str(tmp_path / "cmp"),
    }
    result = compare(config)
    out = tmp_path / "cmp"
    results = json.loads((out / "results.json").read_text())
    assert results["suite"] == ["quiz"]
    assert results["sample_sizes"]["quiz"] == 4
    assert "quiz" in results["methods"][0]["heldout"]
    assert "Δ quiz" in (out / "report.md").read_text()
    assert (out / "learning_vs_forgetting.png").is_file()
    client = MlflowClient(tracking_uri=result.results["tracking"]["uri"])
    runs = client.search_runs([result.results["tracking"]["experiment_id"]])
    assert {r.info.run_name for r in runs} == {"base", "attn"}
    assert all(r.info.status == "FINISHED" for r in runs)
    metrics = next(r for r in runs if r.info.run_name == "attn").data.metrics
    assert "quiz/acc" in metrics
    assert any(k.endswith("sums.jsonl/exact_match") and not k.startswith("/") for k in metrics)


def test_two_suite_tasks_with_one_name_fail_early(tmp_path, model_dir):
    (tmp_path / "quiz.jsonl").write_text('{"q": "q", "options": ["x", "y"], "answer": 1}\n')
    for copy in ("a", "b"):
        (tmp_path / copy).mkdir()
        (tmp_path / copy / "quiz.yaml").write_text(QUIZ.replace("quiz.jsonl", "../quiz.jsonl"))
    config = {"train": dict(model=str(model_dir), data="count_letters", report_to=[]),
              "methods": ["attn"], "output_dir": str(tmp_path / "cmp"),
              "eval": dict(suite=[str(tmp_path / c / "quiz.yaml") for c in "ab"])}
    with pytest.raises(ForgetlessError, match="two tasks are named quiz"):
        compare(config)
    assert not (tmp_path / "cmp" / "base").exists()
