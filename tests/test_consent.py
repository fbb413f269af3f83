"""Model-written code runs only with the user's consent, and never unisolated without a second
opt-in: refusals are one ``forgetless: error:`` line and exit 2 before any model loads; the
unisolated path is tested with the sandbox's namespace step really skipped."""

from __future__ import annotations

import functools
import json

import pytest

from forgetless.errors import ForgetlessError
from test_eval_breadth import CODE_TASK

ROWS = [{"key": "a", "prompt": "def f():\n", "solution": "    return 1\n",
         "test": "assert f() == 1"}]


@pytest.fixture
def code_task(tmp_path, monkeypatch):
    """A one-item code task; consent variables cleared (and whatever a run sets, undone)."""
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "")
    monkeypatch.setenv("FORGETLESS_ALLOW_UNISOLATED", "")
    monkeypatch.setattr("forgetless.eval.consent._warned", False)
    (tmp_path / "code.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (tmp_path / "code.yaml").write_text(CODE_TASK)
    return str(tmp_path / "code.yaml")


@pytest.fixture
def no_namespaces(monkeypatch):
    """The OS refuses the sandbox's namespaces: the real launcher runs without that step
    (for the isolation probe and for the evaluator's runs alike)."""
    import forgetless.eval.evaluator

    unisolated = functools.partial(forgetless.eval.sandbox.run_python, namespaces=False)
    monkeypatch.setattr(forgetless.eval.sandbox, "run_python", unisolated)
    monkeypatch.setattr(forgetless.eval.evaluator, "run_python", unisolated)


def _error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("[forgetless")]
    assert len(lines) == 1, err
    assert lines[0].startswith("forgetless: error: ")
    return lines[0]


def _compare_yaml(tmp_path, task: str) -> str:
    path = tmp_path / "compare.yaml"
    path.write_text(json.dumps({
        "train": {"model": "smollm2-135m", "data": "largest_number", "max_steps": 1},
        "methods": ["full"], "eval": {"suite": [task], "limit": 1},
        "output_dir": str(tmp_path / "out")}))
    return str(path)


def _argv(command: str, task: str, tmp_path) -> list[str]:
    if command == "eval":
        return ["eval", "--suite", task, "--limit", "1"]
    if command == "check":
        return ["check", "--model", "m", "--base", "b", "--suite", task, "--limit", "1"]
    if command == "compare":
        return ["compare", _compare_yaml(tmp_path, task)]
    if command == "tune":
        path = tmp_path / "tune.yaml"
        path.write_text(json.dumps({
            "train": {"model": "smollm2-135m", "data": "largest_number"},
            "eval": {"suite": [task]}, "test": {"baselines": ["full"]},
            "output_dir": str(tmp_path / "out")}))
        return ["tune", str(path)]
    return ["continual", f"eval.suite=[{task}]", f"output_dir={tmp_path / 'out'}",
            "tasks=[count_letters,largest_number]", "methods=[full]"]


@pytest.mark.parametrize("command", ["eval", "check", "compare", "continual", "tune"])
def test_a_code_task_without_consent_is_refused_before_any_model_loads(
        command, code_task, no_model, tmp_path, cli):
    code, _, err = cli(*_argv(command, code_task, tmp_path))
    line = _error_line(err)
    assert code == 2 and "runs model-written code" in line
    assert "--confirm-run-unsafe-code" in line and "HF_ALLOW_CODE_EVAL=1" in line
    assert "confirm_run_unsafe_code: true" in line


@pytest.mark.parametrize("command", ["eval", "check", "compare", "continual", "tune"])
def test_unisolated_execution_is_refused_without_its_own_opt_in(
        command, code_task, no_model, no_namespaces, tmp_path, cli):
    argv = [*_argv(command, code_task, tmp_path), "--confirm-run-unsafe-code"]
    code, _, err = cli(*argv)
    line = _error_line(err)
    assert code == 2 and "cannot isolate" in line and "--allow-unisolated-code" in line
    assert "read-only filesystem" in line and "FORGETLESS_ALLOW_UNISOLATED=1" in line


def test_the_environment_variable_and_config_key_opt_in(code_task, no_model, tmp_path,
                                                        monkeypatch, capsys):
    from forgetless.eval.consent import require_code_consent
    from forgetless.jobs.compare_plan import load_compare_config
    from forgetless.jobs.session import check_inputs

    with pytest.raises(ForgetlessError, match="--confirm-run-unsafe-code"):
        require_code_consent([code_task])
    require_code_consent(["arc_easy"])  # no code task: nothing to consent to
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    require_code_consent([code_task])  # isolated here (or skipped below): allowed
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "")
    config = load_compare_config(_compare_yaml(tmp_path, code_task),
                                 ["confirm_run_unsafe_code=true"])
    assert config.confirm_run_unsafe_code
    with pytest.raises(ForgetlessError, match="--confirm-run-unsafe-code"):
        check_inputs(["largest_number"], config.eval.suite)
    check_inputs(["largest_number"], config.eval.suite,  # the config key is consent too
                 confirm_run_unsafe_code=config.confirm_run_unsafe_code)


def test_python_api_refuses_too(code_task, monkeypatch):
    import forgetless.eval.evaluator as evaluator
    from forgetless.eval import evaluate
    from test_eval_helpers import char_tokenizer
    from tiny_models import tiny_model

    monkeypatch.setattr(evaluator, "generate_greedy",
                        lambda *a, **k: pytest.fail("generated before the consent check"))
    with pytest.raises(ForgetlessError, match="runs model-written code"):
        evaluate(tiny_model("llama"), char_tokenizer(), suite=[code_task], limit=1)


def test_allowed_unisolated_run_says_so_once_and_really_runs_unisolated(
        code_task, no_namespaces, tmp_path, monkeypatch, capsys):
    """With both opt-ins and no namespaces, the program runs with rlimits only (it can write
    outside its folder: what the warning is about), and stderr says so on one line."""
    import forgetless.eval.evaluator as evaluator
    from forgetless.eval import evaluate
    from test_eval_helpers import char_tokenizer
    from tiny_models import tiny_model

    outside = tmp_path / "written-by-the-program"
    completion = f"    open({str(outside)!r}, 'w').write('x')\n    return 1\n"
    monkeypatch.setattr(evaluator, "generate_greedy", lambda *a, prompts, **k: [completion])
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    result = evaluate(model, tokenizer, suite=[code_task, code_task], limit=1,
                      confirm_run_unsafe_code=True, allow_unisolated_code=True)
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("forgetless: warning:")]
    assert len(warnings) == 1 and "without network, pid, read-only filesystem" in warnings[0]
    record = result.per_item["tiny_code"][0]
    assert record["isolation"] == [] and record["correct"] == 1 and outside.exists()


def test_isolated_run_keeps_the_program_inside(code_task, tmp_path, monkeypatch, capsys):
    import forgetless.eval.evaluator as evaluator
    from forgetless.eval import evaluate
    from forgetless.eval.consent import missing_isolation
    from test_eval_helpers import char_tokenizer
    from tiny_models import tiny_model

    if missing_isolation():
        pytest.skip(f"this OS refuses the sandbox's namespaces ({missing_isolation()})")
    outside = tmp_path / "written-by-the-program"
    completion = f"    open({str(outside)!r}, 'w').write('x')\n    return 1\n"
    monkeypatch.setattr(evaluator, "generate_greedy", lambda *a, prompts, **k: [completion])
    result = evaluate(tiny_model("llama"), char_tokenizer(), suite=[code_task], limit=1,
                      confirm_run_unsafe_code=True)
    assert "warning" not in capsys.readouterr().err
    assert result.per_item["tiny_code"][0]["correct"] == 0 and not outside.exists()
