"""TIES / DARE merges of a task vector (forgetless.merging): hand-computed tensors, the model
merge, ``merge_run`` on a run folder, and merged rows in a tiny compare (made, then reused)."""

import json

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaForCausalLM

import forgetless.compare
import forgetless.models
import forgetless.train
from forgetless.compare import compare, load_compare_config
from forgetless.errors import ForgetlessError
from forgetless.interpolate import interpolate
from forgetless.merging import MergeSpec, drop, merge, merge_delta, merge_run, trim
from forgetless.methods import MethodOptions, prepare_model
from forgetless.models import resolve_model
from tiny_models import tiny_llama

# --- the tensor math, by hand ---------------------------------------------------------------


def test_ties_trim_keeps_the_largest_magnitudes_of_either_sign():
    tau = torch.tensor([[0.5, -3.0], [3.0, 1.0]])
    # k = int(0.5 · 4) = 2: both 3s stay whatever their sign (one task vector: no election)
    assert torch.equal(trim(tau, 0.5), torch.tensor([[0.0, -3.0], [3.0, 0.0]]))
    assert torch.equal(trim(tau, 0.75), torch.tensor([[0.0, -3.0], [3.0, 1.0]]))
    spec = MergeSpec(kind="ties", density=0.5, scale=0.5)
    assert torch.equal(merge_delta(tau, spec), torch.tensor([[0.0, -1.5], [1.5, 0.0]]))


def test_ties_equal_magnitudes_at_the_cut_keep_the_earlier_coordinate():
    tau = torch.tensor([1.0, -2.0, 2.0, -2.0, 0.5])
    # k = int(0.4 · 5) = 2 of three |2|s: the first two by position, not topk's choice
    assert torch.equal(trim(tau, 0.4), torch.tensor([0.0, -2.0, 2.0, 0.0, 0.0]))
    assert torch.equal(trim(tau, 0.2), torch.tensor([0.0, -2.0, 0.0, 0.0, 0.0]))
    assert torch.equal(trim(tau, 0.1), torch.zeros(5))  # int(0.5) = 0 kept, as PEFT counts


def test_density_one_is_the_whole_task_vector():
    tau = torch.randn(7, 5)
    assert torch.equal(trim(tau, 1.0), tau)
    assert torch.equal(drop(tau, 1.0, torch.Generator().manual_seed(0)), tau)
    for kind in ("ties", "dare"):
        assert torch.equal(merge_delta(tau, MergeSpec(kind=kind, density=1.0, scale=2.0)),
                           2 * tau)


def test_ties_on_one_task_vector_equals_peft_ties():
    from peft.utils.merge_utils import ties

    tau = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))  # no equal magnitudes
    spec = MergeSpec(kind="ties", density=0.3, scale=0.7)
    expected = ties([tau], torch.tensor([0.7]), density=0.3)
    assert torch.allclose(merge_delta(tau, spec), expected)
    assert int((merge_delta(tau, spec) != 0).sum()) == int(0.3 * tau.numel())


def test_dare_drops_and_rescales_by_one_over_one_minus_p():
    tau = torch.arange(1.0, 2001.0)
    spec = MergeSpec(kind="dare", density=0.25, scale=1.0, seed=3)
    out = merge_delta(tau, spec, "layer.weight")
    kept = out != 0
    assert torch.equal(out[kept], tau[kept] * 4)  # p = 0.75: survivors × 1/(1 − p) = 4
    assert 0.2 < kept.float().mean() < 0.3
    ones = merge_delta(torch.ones(200_000), spec, "w")
    assert ones.mean().item() == pytest.approx(1.0, abs=0.02)  # E[m(τ)] = τ


def test_dare_mask_is_seeded_per_tensor_name():
    tau = torch.randn(64, 64)
    spec = MergeSpec(kind="dare", density=0.5, seed=7)
    first = merge_delta(tau, spec, "a")
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(merge_delta(tau, spec, "a"), first)
    assert not torch.equal(merge_delta(tau, spec, "b"), first)
    assert not torch.equal(merge_delta(tau, MergeSpec(kind="dare", density=0.5, seed=8), "a"),
                           first)


# --- whole models ---------------------------------------------------------------------------


def test_merge_of_a_model_and_of_lora():
    base, tuned = tiny_llama(), tiny_llama()
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(torch.randn_like(param))
    dense = merge(base, tuned, MergeSpec(kind="ties", density=1.0, scale=0.5))
    half = interpolate(base, tuned, 0.5)  # density 1 is interpolation with λ = scale
    for (name, a), b in zip(dense.named_parameters(), half.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    sparse = merge(base, tuned, MergeSpec(kind="ties", density=0.25))
    for (name, p0), p1, m in zip(base.named_parameters(), tuned.parameters(),
                                 sparse.parameters()):
        moved = m != p0
        assert int(moved.sum()) == int(0.25 * p0.numel()), name
        assert torch.equal(m[moved], p1[moved]), name  # kept coordinates at full strength
    again = merge(base, tuned, MergeSpec(kind="dare", density=0.5, seed=1))
    twice = merge(base, tuned, MergeSpec(kind="dare", density=0.5, seed=1))
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), twice.parameters()))

    lora = prepare_model(tiny_llama(), "lora", MethodOptions()).model
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_()
    point = merge(base, lora, MergeSpec(kind="ties", density=0.5))
    q0 = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(point.model.layers[0].self_attn.q_proj.weight, q0)
    assert any("lora_B" in n for n, _ in lora.named_parameters())  # the input is untouched


def test_merge_run_writes_a_loadable_merged_folder(tmp_path):
    base_dir, run = tmp_path / "base", tmp_path / "run"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    base = tiny_llama()
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    tuned = tiny_llama(seed=1)
    tuned.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(base_dir)}))
    spec = {"kind": "dare", "density": 0.5, "seed": 2}
    out = merge_run(run, spec, tmp_path / "merged")
    loaded = LlamaForCausalLM.from_pretrained(out)
    expected = merge(base, tuned, MergeSpec(**spec))
    for (name, a), b in zip(loaded.named_parameters(), expected.parameters()):
        assert torch.equal(a, b), name
    assert (out / "tokenizer_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no leftovers
    with pytest.raises(ForgetlessError, match="no saved model"):
        merge_run(tmp_path / "nowhere", spec, tmp_path / "x")
    with pytest.raises(ForgetlessError, match="merge: bad value for 'density'"):
        merge_run(run, {"kind": "dare", "density": 0}, tmp_path / "x")


# --- compare ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("merges", "message"),
    [
        ([{"kind": "slerp", "density": 0.5}], "merge.0.kind"),
        ([{"kind": "ties", "density": 0.0}], "merge.0.density"),
        ([{"kind": "ties", "density": 1.5}], "merge.0.density"),
        ([{"kind": "dare", "density": 0.5, "scale": -1.0}], "merge.0.scale"),
        ([{"kind": "ties", "density": 0.5, "seed": 1}], "a seed applies to dare only"),
        ([{"kind": "ties", "density": 0.5}, {"kind": "ties", "density": 0.5, "scale": 1}],
         "two entries are the same merge: ties-d0.5"),
        ([{"kind": "ties", "density": 0.5, "methods": ["ful"]}], "ful are not compare entries"),
    ],
)
def test_bad_merge_specs_fail_before_any_model_loads(tmp_path, monkeypatch, merges, message):
    monkeypatch.setattr(forgetless.models, "load_model",
                        lambda *a, **k: pytest.fail("loaded a model before validating merge:"))
    with pytest.raises(ForgetlessError, match=message):
        compare({"methods": ["full"], "merge": merges, "output_dir": str(tmp_path / "cmp")})
    assert not (tmp_path / "cmp").exists()


def test_merge_keys_name_the_rows():
    config = load_compare_config({"merge": [{"kind": "ties", "density": 0.2},
                                            {"kind": "dare", "density": 0.1, "scale": 0.5,
                                             "seed": 3}]})
    assert [spec.key for spec in config.merge] == ["ties-d0.2", "dare-d0.1-s0.5-seed3"]


def test_compare_evaluates_each_merge_as_a_row_and_reuses_it(tmp_path, model_dir, monkeypatch):
    from forgetless.eval import EvalResult

    merges = [{"kind": "dare", "density": 0.5, "seed": 1}]
    config = {
        "train": dict(model=str(model_dir), data="count_letters", limit=8, batch_size=4,
                      max_steps=2, max_length=64, learning_rate=1e-2, report_to=[]),
        "methods": ["full"],
        "eval": dict(suite=["arc_easy"], limit=4, target=None, batch_size=4, drift_prompts=2),
        "merge": merges,
        "seeds": [0, 1],
        "output_dir": str(tmp_path / "cmp"),
    }
    results = compare(config).results
    out = tmp_path / "cmp"
    full = results["methods"][0]
    assert [p["merge"] for p in full["merges"]] == ["dare-d0.5-seed1"]
    record = json.loads((out / "runs" / "full" / "seed1" / "compare.json").read_text())
    assert record["merges"] == {"dare-d0.5-seed1": "eval_merge_dare-d0.5-seed1.json"}
    # the row pools both seeds' merged models: the mean paired change over seeds and items
    base = EvalResult.load(out / "base" / "eval.json").metrics["heldout/gold_logprob"].value
    merged = [EvalResult.load(out / "runs" / "full" / f"seed{s}" / record["merges"][
        "dare-d0.5-seed1"]).metrics["heldout/gold_logprob"].value for s in (0, 1)]
    pooled = full["merges"][0]["heldout_avg"]["gold_logprob"]["delta"]
    assert pooled["value"] == pytest.approx(sum(m - base for m in merged) / 2)
    assert all("merges" not in one for one in full["seeds"])
    report = (out / "report.md").read_text()
    assert "| full dare-d0.5-seed1 |" in report and "rows `name ties-dX`" in report
    file = out / "runs" / "full" / "seed0" / "eval_merge_dare-d0.5-seed1.json"
    stamp = file.stat().st_mtime_ns

    monkeypatch.setattr(forgetless.train, "train", lambda *a, **k: pytest.fail("retrained"))
    real = forgetless.compare._Session.evaluate
    evaluated = []

    def counting(self, model, label, with_base=True):
        evaluated.append(label)
        return real(self, model, label, with_base)

    monkeypatch.setattr(forgetless.compare._Session, "evaluate", counting)
    again = compare(config).results  # finished: nothing trains or evaluates again
    assert evaluated == []
    assert again["methods"][0]["merges"] == full["merges"]
    assert file.stat().st_mtime_ns == stamp

    config["merge"] = [*merges, {"kind": "ties", "density": 0.2}]  # one more merge
    added = compare(config).results
    assert "full seed 0 ties-d0.2" in evaluated  # from the saved weights, not retrained
    assert [p["merge"] for p in added["methods"][0]["merges"]] == [
        "dare-d0.5-seed1", "ties-d0.2"]
    assert "| full ties-d0.2 |" in (out / "report.md").read_text()

    evaluated.clear()  # a merge taken out of the config leaves the report, nothing re-runs
    config["merge"] = merges
    fewer = compare(config).results
    assert evaluated == [] and [p["merge"] for p in fewer["methods"][0]["merges"]] == [
        "dare-d0.5-seed1"]


def test_a_merge_for_some_methods_merges_only_their_runs(tmp_path, model_dir, monkeypatch):
    evaluated = []
    real = forgetless.compare._Session.evaluate

    def counting(self, model, label, with_base=True):
        evaluated.append(label)
        return real(self, model, label, with_base)

    monkeypatch.setattr(forgetless.compare._Session, "evaluate", counting)
    results = compare({
        "train": dict(model=str(model_dir), data="count_letters", limit=8, batch_size=4,
                      max_steps=1, max_length=64, learning_rate=1e-2, report_to=[]),
        "methods": ["full", "attn"],
        "eval": dict(suite=["arc_easy"], limit=2, target=None, batch_size=4, drift_prompts=2),
        "merge": [{"kind": "ties", "density": 0.2, "methods": ["full"]}],
        "output_dir": str(tmp_path / "cmp"),
    }).results
    rows = {row["name"]: row for row in results["methods"]}
    assert [p["merge"] for p in rows["full"]["merges"]] == ["ties-d0.2"]
    assert not rows["attn"].get("merges")
    assert "full ties-d0.2" in evaluated and "attn ties-d0.2" not in evaluated
