"""``compare`` end to end on a tiny Llama: report folder, MLflow store, resume, early errors."""

import json

import pytest
import torch
from transformers import TrainerCallback

import forgetless.compare
import forgetless.jobs.identity
import forgetless.train
from forgetless.compare import (
    DEFAULT_METHODS,
    compare,
    load_compare_config,
    plan_methods,
    redraw,
)
from forgetless.errors import ForgetlessError
from forgetless.interpolate import interpolate
from forgetless.methods import MethodOptions, prepare_model
from tiny_models import tiny_llama


def _config(tmp_path, model_dir, methods, target="auto", **extra):
    return {
        "train": dict(model=str(model_dir), data="count_letters", limit=8, batch_size=4,
                      max_steps=2, max_length=64, learning_rate=1e-2, report_to=[],
                      logging_steps=1),
        "methods": methods,
        "eval": dict(suite=["arc_easy"], limit=4, target=target, target_limit=2, batch_size=4),
        "output_dir": str(tmp_path / "cmp"),
        **extra,
    }


def test_report_folder_and_mlflow_store(tmp_path, model_dir):
    from mlflow.tracking import MlflowClient

    config = _config(tmp_path, model_dir, ["full", {"name": "lora-hi", "method": "lora",
                                                    "learning_rate": 2e-2}], interpolate=[0.5])
    config["eval"]["drift_prompts"] = 3
    result = compare(config)
    out = tmp_path / "cmp"
    for name in ("report.md", "report.html", "results.json", "learning_vs_forgetting.png",
                 "drift_heatmap.png", "loss_curves.png", "update_coverage.png", "mlflow.db"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["methods"]] == ["full", "lora-hi"]
    full = results["methods"][0]
    assert results["target"] == "count_letters"
    assert results["sample_sizes"] == {"arc_easy": 4, "count_letters": 2, "drift_prompts": 3}
    assert full["heldout"]["arc_easy"]["delta"]["n"] == 4
    assert full["train"]["steps"] == 2 and len(full["train"]["loss_history"]) == 2
    assert [h["step"] for h in full["train"]["updates"]] == [1, 2]  # first and last step
    assert [p["lambda"] for p in full["interpolation"]] == [0.5]
    assert full["param_drift"]["total"]["rel_l2"] > 0
    assert results["methods"][1]["train_config"]["learning_rate"] == 2e-2
    versus = results["methods"][1]["vs_reference"]  # lora-hi − full on the same 4 items
    assert versus["reference"] == "full" and "vs_reference" not in full
    lora_acc = results["methods"][1]["heldout"]["arc_easy"]["acc"]["value"]
    full_acc = full["heldout"]["arc_easy"]["acc"]["value"]
    assert versus["heldout"]["arc_easy"]["value"] == pytest.approx(lora_acc - full_acc)
    assert versus["heldout"]["arc_easy"]["n"] == 4
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "src='http" not in html
    assert "full λ=0.5" in (out / "report.md").read_text()
    assert "| method − full |" in (out / "report.md").read_text()
    gold = full["heldout"]["arc_easy"]["gold_logprob"]  # continuous, paired per item
    assert gold["delta"]["n"] == 4 and gold["value"]["value"] <= 0
    assert "Δ held-out avg gold log-prob (nats)" in (out / "report.md").read_text()
    nll = full["target"]["nll_delta"]  # the target's answer NLL, paired per item
    assert nll["n"] == 2 and nll["ci_low"] <= nll["value"] <= nll["ci_high"]
    assert "Δ count_letters NLL (nats/tok)" in (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert redraw(config)["markdown"].read_text().startswith("# forgetless compare")
    redrawn = redraw(config, ["report.forgetting_measure=margin"])["markdown"].read_text()
    assert "Δ arc_easy margin (nats)" in redrawn

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment(result.results["tracking"]["experiment_id"])
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"base", "full", "lora-hi"}
    lora = runs["lora-hi"]
    assert lora.data.params["train.method"] == "lora"
    assert float(lora.data.params["train.learning_rate"]) == 2e-2
    assert {"heldout/acc", "drift/kl", "lambda_0.5/heldout/acc"} <= set(lora.data.metrics)
    assert "heldout/acc" in runs["base"].data.metrics
    losses = client.get_metric_history(lora.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(lora.info.run_id)}
    assert {"eval.json", "metrics.json", "compare.json"} <= artifacts


class _StopAt(TrainerCallback):
    """Simulates Ctrl-C in the middle of one method's training."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_step_end(self, args, state, control, **kwargs):
        if args.output_dir.split("/")[-2] == self.name:
            raise KeyboardInterrupt


def _stop_evaluating(monkeypatch, name: str):
    """Simulates Ctrl-C when compare starts evaluating ``name``; returns the undo."""
    real = forgetless.compare._Session.evaluate

    def interrupted(self, model, label, with_base=True):
        if label == name:
            raise KeyboardInterrupt
        return real(self, model, label, with_base)

    monkeypatch.setattr(forgetless.compare._Session, "evaluate", interrupted)
    return lambda: monkeypatch.setattr(forgetless.compare._Session, "evaluate", real)


def test_interrupted_compare_reuses_finished_methods(tmp_path, model_dir, monkeypatch):
    config = _config(tmp_path, model_dir, ["attn", "mlp-gate-up", "full"], target=None)
    out = tmp_path / "cmp"
    with pytest.raises(KeyboardInterrupt):
        compare(config, callbacks=[_StopAt("full")])
    assert not (out / "results.json").exists()
    assert not (out / "runs" / "full" / "compare.json").exists()
    stamps = {n: (out / "runs" / n / "metrics.json").stat().st_mtime_ns
              for n in ("attn", "mlp-gate-up")}

    trained = []
    real_train = forgetless.train.train

    def counting_train(config, **kwargs):
        trained.append(config.method)
        return real_train(config, **kwargs)

    monkeypatch.setattr(forgetless.train, "train", counting_train)
    result = compare(config)
    assert trained == ["full"]
    for name, stamp in stamps.items():
        assert (out / "runs" / name / "metrics.json").stat().st_mtime_ns == stamp
    assert [m["name"] for m in result.results["methods"]] == ["attn", "mlp-gate-up", "full"]

    evals = {n: (out / "runs" / n / "eval.json").stat().st_mtime_ns for n in stamps}
    monkeypatch.setattr(forgetless.jobs.identity, "METRICS_VERSION", -1)  # a newer metric set
    undo = _stop_evaluating(monkeypatch, "mlp-gate-up")
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while re-evaluating keeps the weights
        compare(config)
    undo()
    compare(config)
    assert trained == ["full"]  # re-evaluated from the saved models, not retrained
    for name, stamp in evals.items():
        assert (out / "runs" / name / "eval.json").stat().st_mtime_ns != stamp

    trained.clear()  # a changed budget invalidates every method
    compare(config, ["train.learning_rate=5e-3", "methods=[attn]"])
    assert trained == ["attn"]


def test_unknown_method_fails_before_any_training(tmp_path, model_dir, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before validating")

    monkeypatch.setattr(forgetless.train, "train", no_training)
    config = _config(tmp_path, model_dir, ["full", "attn", "sgd"])
    with pytest.raises(ForgetlessError, match="unknown method 'sgd'"):
        compare(config)
    assert not (tmp_path / "cmp").exists()


def test_missing_benchmark_data_fails_before_the_base_model_loads(tmp_path, model_dir,
                                                                   monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model before validating the held-out tasks")

    monkeypatch.setattr(forgetless.models, "load_model", no_loading)
    monkeypatch.setenv("FORGETLESS_DATA", str(tmp_path))
    with pytest.raises(ForgetlessError, match="data file not found"):
        compare(_config(tmp_path, model_dir, ["attn"]))


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        (["full", "full"], "duplicate name"),
        ([{"method": "attn", "max_steps": 9}], "max_steps must be the same for every method"),
        ([{"method": "attn", "lr": 1}], "unknown key 'lr'"),
        ([{"method": "attn", "name": "a/b"}], "a name may hold"),
    ],
)
def test_bad_method_entries(methods, message):
    config = load_compare_config({"methods": methods})
    with pytest.raises(ForgetlessError, match=message):
        plan_methods(config)


def test_config_defaults_and_dotted_overrides():
    config = load_compare_config(None, ["train.max_steps=7", "eval.limit=50", "interpolate=[0.5]"])
    plan = plan_methods(config)
    assert [p.name for p in plan] == ["full", "lora", "attn", "mlp-gate-up", "mofo", "attn+mofo"]
    assert len(DEFAULT_METHODS) == 6 and plan[4].train.fraction == 0.1
    assert all(p.train.max_steps == 7 for p in plan) and config.eval.limit == 50
    assert plan[2].train.output_dir.endswith("runs/compare/runs/attn")
    assert config.report.forgetting_measure == "gold_logprob"  # chosen by docs/results.md
    with pytest.raises(ForgetlessError, match="unknown key 'evals'"):
        load_compare_config({"evals": {}})
    with pytest.raises(ForgetlessError, match="interpolate"):
        load_compare_config({"interpolate": [1.5]})


def test_per_task_limits_reach_the_drift_prompts():
    config = load_compare_config({"eval": {"suite": ["arc_easy", "piqa"],
                                           "limit": {"arc_easy": 3, "piqa": 2},
                                           "drift_prompts": 100}})
    assert config.eval.limit == {"arc_easy": 3, "piqa": 2}
    with pytest.raises(ForgetlessError, match="eval.limit"):
        load_compare_config({"eval": {"limit": {"arc_easy": 0}}})
    job = forgetless.compare._Session.__new__(forgetless.compare._Session)
    job.config = config
    assert len(job.drift_prompts()) == 5  # 3 ARC-Easy + 2 PIQA contexts: the limits apply


def test_interpolation_is_linear_and_merges_lora():
    base = tiny_llama()
    tuned = tiny_llama()
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(1.0)
    half = interpolate(base, tuned, 0.25)
    for (name, p0), p1, mid in zip(base.named_parameters(), tuned.parameters(),
                                   half.parameters()):
        assert torch.allclose(mid, p0 + 0.25 * (p1 - p0)), name

    lora = prepare_model(tiny_llama(), "lora", MethodOptions()).model
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_()
    point = interpolate(base, lora, 0.5)
    q0 = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(point.model.layers[0].self_attn.q_proj.weight, q0)
    assert any("lora_B" in n for n, _ in lora.named_parameters())  # the input is untouched


def test_interrupted_evaluation_keeps_the_trained_weights(tmp_path, model_dir, monkeypatch):
    config = _config(tmp_path, model_dir, ["attn"], target=None)
    undo = _stop_evaluating(monkeypatch, "attn")
    with pytest.raises(KeyboardInterrupt):
        compare(config)
    undo()
    monkeypatch.setattr(forgetless.train, "train", lambda *a, **k: pytest.fail("retrained"))
    result = compare(config)
    assert result.results["methods"][0]["train"]["steps"] == 2


def test_seeds_train_per_seed_pool_and_reuse_per_seed(tmp_path, model_dir, monkeypatch):
    from forgetless.eval import EvalResult

    trained = []
    real_train = forgetless.train.train

    def counting_train(config, **kwargs):
        trained.append((config.method, config.seed))
        return real_train(config, **kwargs)

    monkeypatch.setattr(forgetless.train, "train", counting_train)
    # no target: generation is the slow part, and the one-seed test covers the target columns
    config = _config(tmp_path, model_dir, ["full", "attn"], target=None, seeds=[0, 1])
    config["train"]["limit"] = 16  # two seeds see different examples, not only another order
    config["eval"]["drift_prompts"] = 3
    results = compare(config).results
    assert results["sample_sizes"]["drift_prompts"] == 3  # prompts, not the pooled seeds
    out = tmp_path / "cmp"
    assert trained == [("full", 0), ("full", 1), ("attn", 0), ("attn", 1)]
    full, attn = results["methods"]
    assert [one["seed"] for one in full["seeds"]] == [0, 1]
    assert results["sample_sizes"]["drift_prompts"] == full["seeds"][0]["drift"]["kl"]["n"] > 2
    # the pooled change is the mean of the per-seed ones, on the same items
    per_seed = [one["heldout_avg"]["gold_logprob"]["delta"]["value"] for one in full["seeds"]]
    pooled = full["heldout_avg"]["gold_logprob"]["delta"]
    assert pooled["value"] == pytest.approx(sum(per_seed) / 2)
    assert pooled["ci_low"] <= pooled["value"] <= pooled["ci_high"]
    evals = [EvalResult.load(out / "runs" / "full" / f"seed{s}" / "eval.json") for s in (0, 1)]
    assert evals[0].per_item["arc_easy"] != evals[1].per_item["arc_easy"]  # seeds differ
    versus = attn["vs_reference"]["measures"]["gold_logprob"]["avg"]  # paired per seed
    assert versus["value"] == pytest.approx(
        sum(one["vs_reference"]["measures"]["gold_logprob"]["avg"]["value"]
            for one in attn["seeds"]) / 2)
    report = (out / "report.md").read_text()
    assert "pooled over 2 training seeds" in report and "| full | 1 |" in report
    assert "| full | 1 |" in redraw(config)["markdown"].read_text()  # from results.json

    trained.clear()  # a third seed trains only the (method, seed) runs not yet finished
    results = compare(config, ["seeds=[0, 1, 2]", "methods=[full]"]).results
    assert trained == [("full", 2)]
    assert [one["seed"] for one in results["methods"][0]["seeds"]] == [0, 1, 2]


def test_one_seed_is_the_plain_run():
    plain = plan_methods(load_compare_config(None, ["methods=[full]"]))
    one = plan_methods(load_compare_config(None, ["methods=[full]", "seeds=[0]"]))
    assert one[0].train == plain[0].train and one[0].seed is None
    assert one[0].train.output_dir.endswith("runs/full")
    two = plan_methods(load_compare_config(None, ["methods=[full, attn]", "seeds=[3, 4]"]))
    assert [(p.name, p.train.seed, p.train.output_dir.split("/")[-1]) for p in two] == [
        ("full", 3, "seed3"), ("full", 4, "seed4"), ("attn", 3, "seed3"), ("attn", 4, "seed4")]
    with pytest.raises(ForgetlessError, match="either as train.seed or as seeds"):
        plan_methods(load_compare_config(None, ["train.seed=1", "seeds=[0, 1]"]))
    for bad in ("seeds=[]", "seeds=[1, 1]"):
        with pytest.raises(ForgetlessError, match="distinct seeds"):
            load_compare_config(None, [bad])


def test_a_max_length_that_cuts_every_response_fails_before_the_base_evaluation(
        tmp_path, model_dir, monkeypatch):
    monkeypatch.setattr(forgetless.compare._Session, "evaluate",
                        lambda *a, **k: pytest.fail("evaluated the base before the data check"))
    config = _config(tmp_path, model_dir, ["full", "attn"])
    config["train"]["max_length"] = 8  # every count_letters prompt is longer
    with pytest.raises(ForgetlessError, match="no example keeps a response token within 8"):
        compare(config)
    assert not (tmp_path / "cmp" / "base" / "eval.json").exists()
