"""``forgetless tune`` on a tiny Llama: a 3-trial search, resume after a kill, early errors,
and a ``best.yaml`` that ``forgetless train`` runs as is."""

import json
import os
import subprocess
import sys
import types

import pytest
import yaml

from forgetless.errors import ForgetlessError
from forgetless.tune import load_tune_config, tune

ENV = {**os.environ, "PYTHONPATH": "src", "FORGETLESS_FAULT_AT": "", "FORGETLESS_DEBUG": ""}


def _config(tmp_path, model_dir, **extra):
    return {
        "train": dict(model=str(model_dir), data="count_letters", limit=8, batch_size=4,
                      max_length=64, logging_steps=1),
        "space": {"method": ["full", "attn", "lora"],
                  "learning_rate": {"low": 1e-3, "high": 3e-2, "log": True},
                  "max_steps": [1, 2], "lora_r": [2, 4]},
        "budget": {"max_heldout_drop": 50, "max_kl": 5.0},
        "search": {"n_trials": 3, "monitor_every": 1, "prune_startup_trials": 1},
        "eval": {"suite": ["arc_easy"], "target": "count_letters", "batch_size": 4,
                 "drift_prompts": 2, "validation": {"limit": 3, "target_limit": 2},
                 "test": {"limit": 3, "target_limit": 2}},
        "test": {"seeds": [0], "baselines": ["full"]},
        "output_dir": str(tmp_path / "tune"),
        **extra,
    }


def test_tiny_search_report_and_best_yaml(tmp_path, model_dir):
    results = tune(_config(tmp_path, model_dir))
    out = tmp_path / "tune"
    for name in ("tune.md", "tune.html", "pareto.png", "optuna.db", "mlflow.db", "tune.json"):
        assert (out / name).is_file(), name
    assert results["counts"]["total"] == 3
    assert results["counts"]["complete"] + results["counts"]["pruned"] == 3
    assert results["best"] is not None
    names = [(r["name"], r["seed"]) for r in results["test"]]
    assert names == [("recommended", 0), ("full", 0)]
    # the test sample is disjoint from the validation sample
    val = json.loads((out / "base" / "validation.json").read_text())["per_item"]
    test = json.loads((out / "base" / "test.json").read_text())["per_item"]
    for task in ("arc_easy", "count_letters"):
        assert not {r["id"] for r in val[task]} & {r["id"] for r in test[task]}, task
    assert "3 run" in (out / "tune.md").read_text()
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["method"] == results["best"]["recipe"]["method"]
    best["max_steps"] = 1  # the recipe as is, one step for time
    best["report_to"] = []
    (out / "best.yaml").write_text(yaml.safe_dump(best))
    done = subprocess.run([sys.executable, "-m", "forgetless", "train", str(out / "best.yaml")],
                          env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "best" / "metrics.json").is_file()
    # a second run reuses everything: no trial trains again
    again = tune(_config(tmp_path, model_dir))
    assert again["counts"]["total"] == 3


def test_resume_after_kill(tmp_path, model_dir):
    config = _config(tmp_path, model_dir)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "forgetless", "tune", str(path)]
    killed = subprocess.run(command, env={**ENV, "FORGETLESS_FAULT_AT": "tune.trial_done:2"},
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = tmp_path / "tune"
    assert not (out / "tune.json").exists()
    finished = [p for p in (out / "trials").iterdir() if (p / "tune.json").is_file()]
    assert len(finished) >= 1
    log = tmp_path / "faults.log"
    done = subprocess.run(command, env={**ENV, "FORGETLESS_FAULT_LOG": str(log)},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "tune.json").read_text())
    assert results["counts"]["interrupted"] == 1
    counted = results["counts"]["complete"] + results["counts"]["pruned"]
    assert counted == 3
    # the killed trial's finished folder was reused; only the missing trial(s) trained
    # (one new trial + the two test runs: recommended and full)
    points = log.read_text().split()
    assert sum(p.startswith("tune.run_done:") for p in points) == 3
    assert "reusing the finished run" in done.stdout


@pytest.mark.parametrize("change, message", [
    ({"space": {"method": ["full", "nope"]}}, "nope"),
    ({"space": {"method": ["full"], "learning_rate": {"low": 1, "high": 0.1}}}, "low"),
    ({"space": {"method": ["full"], "model": ["x"]}}, "cannot be searched"),
    ({"space": {"method": ["full"], "lr": [1e-3]}}, "unknown key 'lr'"),
    ({"search": {"n_trials": None}}, "n_trials"),
    ({"budget": {"max_kll": 1}}, "max_kll"),
])
def test_bad_config_fails_before_a_model_loads(tmp_path, model_dir, change, message):
    config = {**_config(tmp_path, model_dir), **change}
    with pytest.raises(ForgetlessError, match=message):
        tune(config)
    assert not (tmp_path / "tune").exists()


def test_cli_error_is_one_line_exit_2(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("space: {method: [full, nope]}\noutput_dir: " + str(tmp_path / "o") + "\n")
    done = subprocess.run([sys.executable, "-m", "forgetless", "tune", str(path)], env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("forgetless: error:") and done.stderr.count("\n") == 1


def test_example_config_loads():
    config = load_tune_config("configs/tune.yaml")
    assert config.search.n_trials >= 12


@pytest.mark.parametrize("step, max_steps, pruned", [
    (2, 6, False),  # before prune_warmup: the early loss favours high learning rates
    (4, 6, True),   # past warm-up and worse than the median: pruned
    (6, 6, False),  # the last step: only the evaluation is left, which measures the target
])
def test_median_pruner_waits_and_spares_the_last_step(step, max_steps, pruned):
    import optuna

    from forgetless.jobs.tune_study import TrialGuard

    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(
        n_startup_trials=1, n_warmup_steps=4))
    done = study.ask()
    for s in (2, 4, 6):
        done.report(0.5, s)
    study.tell(done, 0.5)
    trial = study.ask()
    guard = TrialGuard(trial, 1.0, False)
    control = types.SimpleNamespace(should_training_stop=False)
    guard.on_log(None, types.SimpleNamespace(global_step=step, max_steps=max_steps), control,
                 logs={"loss": 2.0})
    assert bool(guard.pruned) is pruned
    assert control.should_training_stop is pruned


def test_prune_warmup_reaches_the_pruner(tmp_path):
    from forgetless.jobs.tune_study import open_study

    config = load_tune_config(None, ["search.prune_warmup=4", f"output_dir={tmp_path}"])
    session = types.SimpleNamespace(config=config, out=tmp_path,
                                    violations=lambda scores: {})
    assert open_study(session).pruner._n_warmup_steps == 4


def test_a_searched_max_length_that_cuts_every_response_fails_before_the_search(
        tmp_path, model_dir, monkeypatch):
    import forgetless.tune

    monkeypatch.setattr(forgetless.tune._Session, "evaluate",
                        lambda *a, **k: pytest.fail("evaluated before the data check"))
    config = _config(tmp_path, model_dir)
    config["space"]["max_length"] = [64, 8]
    with pytest.raises(ForgetlessError, match="no example keeps a response token within 8"):
        tune(config)



def _session(tmp_path):
    from forgetless import tune as job

    config = load_tune_config({
        "train": {"data": "count_letters", "dtype": "bfloat16", "device": "cpu",
                  "attn_implementation": "eager"},
        "eval": {"suite": ["arc_easy"], "target": "count_letters"},
        "output_dir": str(tmp_path / "tune")})
    return job, config, job._Session(config, None)


def test_session_hashes_the_dtype_it_evaluates_in(tmp_path):
    """A float32 base evaluation is not reused by a bfloat16 search (it used to be)."""
    job, config, session = _session(tmp_path)
    assert session.val_hash == job.eval_hash(config, "validation", "count_letters",
                                             "smollm2-135m", "bfloat16")
    assert session.val_hash != job.eval_hash(config, "validation", "count_letters",
                                             "smollm2-135m")


class _Loaded(Exception):
    """Raised by a stand-in model loader: carries what the job asked it for."""


def test_base_loads_with_attn_implementation(tmp_path, monkeypatch):
    """tune loaded its base without ``attn_implementation`` (compare and continual pass it)."""
    import forgetless.models

    def loader(name, **kwargs):
        raise _Loaded(kwargs)

    _, _, session = _session(tmp_path)
    monkeypatch.setattr(forgetless.models, "load_model", loader)
    with pytest.raises(_Loaded) as loaded:
        session.load_base()
    assert loaded.value.args[0]["attn_implementation"] == "eager"


def test_default_baselines_are_method_entries():
    """The default test.baselines' mofo entry was a raw dict (defaults were not validated), so
    a search with the default baselines failed with an AttributeError in its early check."""
    from forgetless.config import MethodEntry
    from forgetless.jobs.tune_space import TestSettings

    entries = TestSettings().baselines
    assert [e if isinstance(e, str) else (e.name, e.method) for e in entries] == [
        "full", "attn", ("mofo", "mofo")]
    assert isinstance(entries[2], MethodEntry) and entries[2].model_extra == {"fraction": 0.1}


def test_remedy_settings_are_searchable_mix_by_position():
    """A mix: list is a structured choice (drawn by its position), kl_weight / ewc_lambda ranges
    are sampled only for the methods that read them; a bad choice fails the config check."""
    import optuna

    from forgetless.jobs.tune_space import Range, check_config, load_tune_config, suggest

    mixes = [[], [{"source": "gsm8k", "ratio": 0.1}], [{"source": "gsm8k", "ratio": 0.3}]]
    space = {"method": ["full+kl", "full+ewc", "full"], "mix": mixes,
             "kl_weight": Range(low=0.01, high=1.0, log=True),
             "ewc_lambda": Range(low=0.001, high=0.1, log=True)}
    kl = suggest(optuna.trial.FixedTrial({"method": "full+kl", "mix": 2, "kl_weight": 0.2}),
                 space)
    assert kl == {"method": "full+kl", "mix": mixes[2], "kl_weight": 0.2}
    plain = suggest(optuna.trial.FixedTrial({"method": "full", "mix": 0}), space)
    assert plain == {"method": "full", "mix": []}
    check_config(load_tune_config({"train": {"data": "largest_number"}, "space": space}))
    bad = {**space, "mix": [[{"source": "gsm8k", "ratio": 1.5}]]}
    with pytest.raises(ForgetlessError, match="space.mix"):
        check_config(load_tune_config({"train": {"data": "largest_number"}, "space": bad}))
