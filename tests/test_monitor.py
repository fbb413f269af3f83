"""ForgettingMonitor: logs drift through the Trainer, stops a run at max_kl, reports its cost."""

import json

import pytest
from transformers import AutoTokenizer

from forgetless.models import resolve_model
from forgetless.monitor import ForgettingMonitor
from forgetless.train import train
from tiny_models import tiny_llama

PROBES = ["The capital of France is", "Water boils at", "A cat has four", "She counted the"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


def _train(tmp_path, tokenizer, monitor=None, **overrides):
    settings = dict(data="count_letters", limit=16, batch_size=4, max_steps=8, max_length=64,
                    method="full", learning_rate=1e-2, logging_steps=1, report_to=[],
                    save_model=False, output_dir=str(tmp_path / "run"))
    return train(model=tiny_llama(), tokenizer=tokenizer,
                 callbacks=[monitor] if monitor else None, **{**settings, **overrides})


def test_values_reach_the_trainer_log(tmp_path, tokenizer):
    monitor = ForgettingMonitor(every=2, prompts=PROBES, action="warn")
    result = _train(tmp_path, tokenizer, monitor)
    assert result.metrics["steps"] == 8 and monitor.stopped is None
    logged = [e for e in json.loads((tmp_path / "run" / "metrics.json").read_text())["monitor"]]
    assert logged[0]["checks"] == 4
    assert [h["step"] for h in monitor.history] == [2, 4, 6, 8]
    kls = [h["forgetting/kl"] for h in monitor.history]
    assert all(kl > 0 for kl in kls)  # lr 1e-2 moves a random tiny model off its base
    assert all(0 <= h["forgetting/number_mass"] <= 1 for h in monitor.history)
    assert monitor.overhead > 0
    # the Trainer's own loss logs survive on the steps the monitor logs too
    assert [h["step"] for h in result.loss_history] == list(range(1, 9))


def test_bf16_run_measures_against_a_real_copy(tmp_path, tokenizer):
    """With bf16 the Trainer wraps the model's forward in autocast; the base copy must not
    keep calling the live model through that wrapper (KL was always 0)."""
    monitor = ForgettingMonitor(every=2, prompts=PROBES, action="warn")
    _train(tmp_path, tokenizer, monitor, dtype="bfloat16", max_steps=4)
    assert all(h["forgetting/kl"] > 0 for h in monitor.history)
    assert "forward" not in monitor.base.__dict__


def test_max_kl_stops_the_run(tmp_path, tokenizer):
    monitor = ForgettingMonitor(every=1, max_kl=1e-6, prompts=PROBES)
    result = _train(tmp_path, tokenizer, monitor, max_steps=20)
    assert result.metrics["steps"] == 1  # stopped at the first check
    assert monitor.stopped["step"] == 1 and "max_kl" in monitor.stopped["reason"]
    assert result.metrics["monitor"][0]["stopped"]["step"] == 1


def test_config_switches_it_on_and_logs_to_tensorboard(tmp_path, tokenizer, monkeypatch):
    import forgetless.monitor as monitor_module

    monkeypatch.setattr(monitor_module, "default_probe_prompts", lambda *a, **k: PROBES)
    result = _train(tmp_path, tokenizer, monitor_every=3, report_to=["tensorboard"],
                    max_steps=6)
    summary = result.metrics["monitor"][0]
    assert summary["checks"] == 2 and summary["stopped"] is None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "run" / "trainer").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert "train/forgetting/kl" in tags or "forgetting/kl" in tags
