"""Parameter-update analytics: names map to module types and layers; MoFO moves a share of the
coordinates per step while AdamW moves them all; values reach the Trainer's log."""

import pytest
from transformers import AutoTokenizer, TrainerCallback

from forgetless.errors import ForgetlessError
from forgetless.models import resolve_model
from forgetless.updates import UpdateAnalytics, layer_of, module_type
from test_train import _train


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


class _Logs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**logs, "step": state.global_step})


def test_names_to_types_and_layers():
    assert module_type("model.layers.3.self_attn.q_proj.weight") == "q"
    assert module_type("model.layers.0.mlp.down_proj.weight") == "down"
    assert module_type("model.layers.1.post_attention_layernorm.weight") == "norm"
    assert module_type("model.embed_tokens.weight") == "embed"
    assert module_type("base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight") \
        == "v.lora"
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "12"
    assert layer_of("model.norm.weight") == "other"
    with pytest.raises(ForgetlessError):
        UpdateAnalytics(every=0)


def test_dense_moves_everything_mofo_a_share(tmp_path, tokenizer):
    full = _train(tmp_path / "full", tokenizer, method="attn", max_steps=4,
                  update_stats_every=2, save_model=False, logging_steps=1)
    stats = full.metrics["update_analytics"]
    assert [h["step"] for h in stats["history"]] == [1, 2, 4]
    assert stats["by_type"]["q"]["moved"] > 0.99  # AdamW: every coordinate of a trained tensor
    assert stats["by_type"]["q"]["drift"] > 0 and stats["history"][-1]["rms"] > 0
    assert set(stats["by_type"]) == {"q", "k", "v", "o"}
    seen = _Logs()
    mofo = _train(tmp_path / "mofo", tokenizer, method="attn+mofo", fraction=0.1, max_steps=4,
                  update_stats_every=2, save_model=False, logging_steps=1, callbacks=[seen])
    history = mofo.metrics["update_analytics"]["history"]
    assert all(0.05 < h["moved"] < 0.15 for h in history)  # ~ the MoFO fraction per step
    ever = [h["moved_ever"] for h in history]
    assert ever == sorted(ever) and ever[-1] > history[-1]["moved"]
    logged = [log for log in seen.logs if "updates/moved/total" in log]
    assert [log["step"] for log in logged] == [1, 2, 4]
    assert "updates/drift/layer/0" in logged[-1] and "updates/rms/type/q" in logged[-1]


def test_off_when_not_asked(tmp_path, tokenizer):
    result = _train(tmp_path, tokenizer, method="attn", max_steps=1, update_stats_every=None,
                    save_model=False)
    assert result.metrics["update_analytics"] is None


def test_measure_matches_the_plain_formulas_on_a_non_contiguous_weight():
    """The fused measure (scratch buffer, count_nonzero, dot products) equals the definitions."""
    import torch

    layer = torch.nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        layer.weight.data = layer.weight.data.t().contiguous().t()  # non-contiguous strides
    model = torch.nn.Module()
    model.q_proj = layer
    analytics = UpdateAnalytics(every=1)

    class State:
        global_step, max_steps = 0, 5

    analytics.on_train_begin(None, State, None, model=model)
    start = layer.weight.detach().clone()
    analytics.on_pre_optimizer_step(None, State, None)
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight[0, :3] += 0.5
    analytics.on_optimizer_step(None, State, None)
    values, now = analytics._pending, layer.weight.detach()
    assert values["updates/moved/type/q"] == 3 / 24 == values["updates/moved_ever/total"]
    assert abs(values["updates/rms/total"] - float((now - before).pow(2).mean().sqrt())) < 1e-6
    drift = float((now - start).norm() / start.norm())
    assert abs(values["updates/drift/total"] - drift) < 1e-6


def test_a_sampled_tensor_gives_close_estimates_whatever_the_pattern():
    """Above ``sample`` coordinates a tensor is tracked on a fixed random subset: moved shares,
    RMS and drift are close to the exact values for a random step and for a strided one (the
    pattern a strided subset would alias with), and the memory is the sample's."""
    import torch

    from forgetless.updates import analytics_bytes, tracked_indices

    assert torch.equal(tracked_indices(10**6, 4096, seed=3), tracked_indices(10**6, 4096, seed=3))
    assert tracked_indices(8192, 4096, seed=3) is None and tracked_indices(10, None, 0) is None
    assert len(tracked_indices(8193, 4096, seed=3)) == 4096

    class State:
        global_step, max_steps = 0, 5

    for pattern in ("random", "strided"):
        torch.manual_seed(0)
        layer = torch.nn.Linear(384, 600, bias=False)
        model = torch.nn.Module()
        model.q_proj = layer
        sampled, exact = UpdateAnalytics(every=1, sample=4096), UpdateAnalytics(every=1,
                                                                                  sample=None)
        for analytics in (sampled, exact):
            analytics.on_train_begin(None, State, None, model=model)
            analytics.on_pre_optimizer_step(None, State, None)
        with torch.no_grad():  # a MoFO-like step: 10% of the coordinates move
            flat = layer.weight.view(-1)
            if pattern == "random":
                chosen = torch.rand(flat.shape) < 0.1
                flat[chosen] += 0.01 * torch.randn(int(chosen.sum()))
            else:
                flat[::10] += 0.01 * torch.randn(flat[::10].shape)
        for analytics in (sampled, exact):
            analytics.on_optimizer_step(None, State, None)
        estimate, truth = sampled._pending, exact._pending
        for measure in ("moved", "moved_ever"):
            key = f"updates/{measure}/total"
            assert abs(truth[key] - 0.1) < 0.01, pattern
            assert abs(estimate[key] - truth[key]) < 0.015, (pattern, estimate[key])
        for measure in ("rms", "drift"):
            key = f"updates/{measure}/total"
            assert abs(estimate[key] / truth[key] - 1) < 0.1, (pattern, measure)
        summary = sampled.summary()
        assert summary["tracked_coordinates"] == 4096
        assert summary["bytes"] == analytics_bytes([layer.weight], 4096) == 4096 * 17
        assert exact.summary()["bytes"] == analytics_bytes([layer.weight], None) == 600 * 384 * 9
