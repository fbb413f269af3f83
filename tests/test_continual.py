"""Continual runs: R matrix and its summary numbers, resumable stages, report and MLflow."""

import json
from pathlib import Path

import pytest

from forgetless.continual import (
    continual,
    continual_metrics,
    extract_letter,
    load_continual_config,
    register_arc_letter,
)
from forgetless.errors import ForgetlessError


def test_metrics_from_a_hand_made_matrix():
    # rows: base, after stage 1..3; columns: tasks 1..3
    R = [[0.1, 0.2, 0.3],
         [0.8, 0.3, 0.3],
         [0.6, 0.9, 0.4],
         [0.5, 0.7, 0.9]]
    m = continual_metrics(R)
    assert m["acc"] == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert m["bwt"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert m["fwt"] == pytest.approx(((0.3 - 0.2) + (0.4 - 0.3)) / 2)
    assert m["forgetting"] == pytest.approx(((0.8 - 0.5) + (0.9 - 0.7)) / 2)
    with pytest.raises(ForgetlessError):
        continual_metrics([[0.1], [0.2]])


def test_arc_letter_task(tmp_path):
    train_file = register_arc_letter(tmp_path)
    rows = [json.loads(line) for line in Path(train_file).read_text().splitlines()]
    assert len(rows) > 2000 and {r["response"] for r in rows} <= set("ABCDE")
    assert "A. " in rows[0]["prompt"]
    assert [extract_letter(t) for t in ("B", " (C) because", "Answer: D.", "a")] == [
        "B", "C", "D", "A"]


def test_unscorable_user_task_is_an_error(tmp_path):
    config = load_continual_config({"tasks": ["count_letters", {"name": "x", "data": "x.jsonl"}],
                                    "output_dir": str(tmp_path)})
    with pytest.raises(ForgetlessError, match="give 'target:'"):
        continual(config, track=False)


def _write_task(folder, name, pairs):
    rows = [json.dumps({"prompt": p, "response": r}) for p, r in pairs]
    (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    return str(folder / f"{name}.jsonl")


def test_three_stages_two_methods_resume(tmp_path, model_dir, capsys, monkeypatch):
    sums = [(f"What is {a} plus {b}?", str(a + b)) for a in range(6) for b in range(6)]
    doubles = [(f"Double {a}.", str(2 * a)) for a in range(30)]
    tasks = ["count_letters",
             {"name": "sums", "data": _write_task(tmp_path, "sums", sums[:30]),
              "target": _write_task(tmp_path, "sums_test", sums[30:])},
             {"name": "doubles", "data": _write_task(tmp_path, "doubles", doubles[:24]),
              "target": _write_task(tmp_path, "doubles_test", doubles[24:])}]
    config = {"model": str(model_dir), "tasks": tasks, "methods": ["full", "attn"],
              "train": {"max_steps": 2, "batch_size": 2, "max_length": 64, "limit": 4,
                        "learning_rate": 1e-2, "report_to": [], "logging_steps": 1},
              "eval": {"suite": ["arc_easy"], "limit": 3, "target_limit": 3, "batch_size": 4},
              "output_dir": str(tmp_path / "out")}
    out = tmp_path / "out"

    # interrupted in the last stage of the second method
    import forgetless.train

    real_train = forgetless.train.train

    def crash_in_attn_stage3(config, **kwargs):
        if config.output_dir.endswith("stage3-doubles") and config.method == "attn":
            raise KeyboardInterrupt
        return real_train(config, **kwargs)

    monkeypatch.setattr(forgetless.train, "train", crash_in_attn_stage3)
    with pytest.raises(KeyboardInterrupt):
        continual(config)
    assert not (out / "continual.json").exists()
    monkeypatch.setattr(forgetless.train, "train", real_train)
    capsys.readouterr()

    summary = continual(config)  # resumes: only attn stage 3 trains
    log = capsys.readouterr().out
    assert log.count("finished before") == 5 and log.count("training on") == 1
    assert "attn stage 3/3: training on doubles" in log
    assert summary["tasks"] == ["count_letters", "sums", "doubles"]
    for name in ("full", "attn"):
        data = summary["methods"][name]
        assert len(data["R"]) == 4 and all(len(row) == 3 for row in data["R"])
        assert all(0 <= v <= 1 for row in data["R"] for v in row)
        assert data["bwt"] == pytest.approx(continual_metrics(data["R"])["bwt"])
        assert len(data["trajectory"]["heldout/acc"]) == 4
        assert len(data["heldout_change"]["gold_logprob"]) == 3
        assert data["heldout_change"]["gold_logprob"][0]["n"] == 3
        assert (out / f"R_{name}.png").is_file()
        # only the last stage keeps its weights (keep_models: false)
        assert not (out / name / "stage1-count_letters" / "model").exists()
        assert (out / name / "stage3-doubles" / "model" / "config.json").is_file()
    assert (out / "heldout_curve.png").is_file() and (out / "mlflow.db").is_file()
    assert "BWT" in (out / "continual.md").read_text()
    assert "gold_logprob (nats)" in (out / "continual.md").read_text()
    saved = json.loads((out / "continual.json").read_text())
    assert saved["methods"]["full"]["R"] == summary["methods"]["full"]["R"]
    logged = json.loads((out / "mlflow.json").read_text())
    assert set(logged) == {"full", "attn"}

    again = continual(config)  # all finished: nothing trains, MLflow runs are reused
    log = capsys.readouterr().out
    assert log.count("finished before") == 6 and "training on" not in log
    assert again["methods"] == summary["methods"]
    assert json.loads((out / "mlflow.json").read_text()) == logged


def test_paired_heldout_change_per_stage():
    from forgetless.continual import change_rows, heldout_change
    from forgetless.eval import EvalResult

    def result(logprobs, correct):
        return EvalResult(per_item={"quiz": [
            {"id": str(i), "correct": c, "gold_logprob": lp, "margin": lp + 1}
            for i, (lp, c) in enumerate(zip(logprobs, correct))]})

    base = result([-1.0, -0.5, -2.0, -0.7], [1, 1, 0, 1])
    after = result([-1.2, -0.6, -2.5, -0.8], [1, 1, 0, 1])
    change = heldout_change(base, after, ["quiz"], "gold_logprob")
    assert change["value"] == pytest.approx(-0.225) and change["n"] == 4
    assert heldout_change(base, after, ["quiz"], "correct")["value"] == 0.0
    old = EvalResult(per_item={"quiz": [{"id": "0", "correct": 1}]})  # before METRICS_VERSION 3
    assert heldout_change(base, old, ["quiz"], "gold_logprob") is None
    summary = {"methods": {"full": {"heldout_change": {
        "accuracy": [heldout_change(base, after, ["quiz"], "correct")],
        "gold_logprob": [change], "margin": [None]}}}}
    rows = change_rows(summary)
    assert rows[0][:2] == ["full", "accuracy (pts)"] and rows[0][2].startswith("+0.0")
    assert rows[1][2].startswith("-0.225*") and rows[2] == ["full", "margin (nats)", "–"]


def test_a_code_task_in_the_held_out_suite(tmp_path, model_dir, monkeypatch):
    """humaneval-style tasks (generation run in the sandbox, per-token solution log-prob) work as
    continual's held-out suite: pass@1 per stage and the paired log-prob change."""
    import forgetless.eval.evaluator as evaluator
    from test_eval_breadth import CODE_TASK

    rows = [{"key": k, "prompt": f"def {k}():\n", "solution": "    return 1\n",
             "test": f"assert {k}() == 1"} for k in ("f", "g")]
    (tmp_path / "code.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "code.yaml").write_text(CODE_TASK)
    def fake_greedy(model, tokenizer, rows, *args, prompts=None, **kwargs):
        return ["    return 1\n"] * len(prompts if prompts is not None else rows)

    monkeypatch.setattr(evaluator, "generate_greedy", fake_greedy)
    config = {"model": str(model_dir), "tasks": ["count_letters", "largest_number"],
              "methods": ["full"],
              "train": {"max_steps": 1, "batch_size": 2, "max_length": 64, "limit": 2,
                        "report_to": [], "logging_steps": 1},
              "eval": {"suite": [str(tmp_path / "code.yaml")], "limit": 2, "target_limit": 2,
                       "batch_size": 4},
              "output_dir": str(tmp_path / "out"), "confirm_run_unsafe_code": True}
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "")  # the opt-in sets it: undone after the test
    summary = continual(config, track=False)
    data = summary["methods"]["full"]
    assert data["trajectory"]["heldout/acc"] == [1.0] * 3  # both programs pass, each stage
    assert data["heldout_change"]["gold_logprob"][0]["n"] == 2
    assert "gold_logprob (nats)" in (tmp_path / "out" / "continual.md").read_text()


def test_a_later_stage_whose_max_length_cuts_every_response_fails_first(tmp_path, model_dir,
                                                                        monkeypatch):
    import forgetless.continual

    monkeypatch.setattr(forgetless.continual._Run, "evaluate",
                        lambda *a, **k: pytest.fail("evaluated before the data check"))
    doubles = [(f"Double {a}.", str(2 * a)) for a in range(30)]
    tasks = ["count_letters",
             {"name": "doubles", "data": _write_task(tmp_path, "doubles", doubles[:24]),
              "target": _write_task(tmp_path, "doubles_test", doubles[24:]),
              "train": {"max_length": 8}}]
    config = {"model": str(model_dir), "tasks": tasks, "methods": ["attn"],
              "train": {"max_steps": 1, "batch_size": 2, "max_length": 64, "limit": 4,
                        "report_to": []},
              "eval": {"suite": ["arc_easy"], "limit": 3, "target_limit": 3},
              "output_dir": str(tmp_path / "out")}
    with pytest.raises(ForgetlessError, match="no example keeps a response token within 8"):
        continual(config)


def test_replay_mixes_earlier_stages_into_later_ones(tmp_path, model_dir, monkeypatch):
    import forgetless.train

    doubles = [(f"Double {a}.", str(2 * a)) for a in range(30)]
    tasks = ["count_letters",
             {"name": "doubles", "data": _write_task(tmp_path, "doubles", doubles[:24]),
              "target": _write_task(tmp_path, "doubles_test", doubles[24:])}]
    config = {"model": str(model_dir), "tasks": tasks, "methods": ["full"],
              "train": {"max_steps": 2, "batch_size": 2, "max_length": 64, "limit": 4,
                        "report_to": []},
              "replay": {"size": 3, "share": 0.5},
              "eval": {"suite": ["arc_easy"], "limit": 2, "target_limit": 2, "batch_size": 4,
                       "drift": False},
              "output_dir": str(tmp_path / "out")}
    real_train, runs = forgetless.train.train, []

    def recording(config, **kwargs):
        runs.append(real_train(config, **kwargs))
        return runs[-1]

    monkeypatch.setattr(forgetless.train, "train", recording)
    continual(config)
    first, second = runs
    assert "mix" not in first.metrics  # nothing earlier to replay
    replayed = second.metrics["mix"]["sources"][1]
    assert replayed["rows"] == 3 and replayed["examples"] == 2  # half of 2 steps x 2
    buffer = (tmp_path / "out" / "replay" / "stage2.jsonl").read_text().splitlines()
    assert len(buffer) == 3 and all("letter" in line for line in buffer)  # stage 1's rows
