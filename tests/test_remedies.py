"""The remedies of issue 24 that live in the methods: +kl / +dft / +asft, +ewc, layer freezing.

Each is checked against an independent statement of its formula: the KL term and its gradient
against autograd of the explicit sum, DFT against its per-token definition, the Fisher against
finite differences of each example's loss, the EWC gradient against autograd of the penalty.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F

from forgetless.errors import ForgetlessError
from forgetless.methods import MethodOptions, parse_method, prepare_model
from forgetless.methods import ewc as ewc_module
from forgetless.methods.ewc import EWCPenalty, estimate_fisher
from forgetless.methods.kl import KLAnchor, dft_loss
from tiny_models import VOCAB, tiny_model


def _batch(vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[1, 9:] = -100  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


# --- names ----------------------------------------------------------------------------------


def test_new_names_parse_and_combine():
    assert parse_method("asft").name == "full+asft"
    choice = parse_method("ATTN + asft + mofo")
    assert choice.name == "attn+mofo+asft" and choice.dft and choice.kl and choice.mofo
    assert parse_method("attn+dft+kl").name == "attn+asft"
    assert parse_method("kl+attn").name == "attn+kl" and not parse_method("attn+kl").dft
    assert parse_method("ewc").name == "full+ewc" and parse_method("attn+ewc+mofo").ewc
    chosen = parse_method("freeze-bottom:4+mlp-gate-up+kl")
    assert chosen.name == "mlp-gate-up+freeze-bottom:4+kl" and chosen.layers.bottom == 4
    assert parse_method("layers:2-5").layers.name == "layers:2-5"
    assert parse_method("attn+layers:3").layers.name == "layers:3"


@pytest.mark.parametrize("bad, message", [
    ("lwf+kl", "both distil"),
    ("asft+kl", "asft already is dft"),
    ("lora+ewc", "LoRA"),
    ("l2-anchor+ewc", "both penalties"),
    ("kl+kl", "unknown method"),
    ("freeze-bottom:0", "N >= 1"),
    ("freeze-bottom:two", "whole number"),
    ("layers:5-2", "empty range"),
    ("layers:1-", "layer range"),
    ("layers:1-2+freeze-bottom:1", "one layer selection"),
    ("attn+freeze_bottom:2", "unknown method"),
])
def test_bad_combinations_are_one_clear_error(bad, message):
    with pytest.raises(ForgetlessError, match=re.escape(message)):
        parse_method(bad)


# --- KL on the training tokens ----------------------------------------------------------------


def _explicit_kl(logits, base_logits, labels, direction):
    """Σ over response positions of the KL written out with softmax, / their count."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            p_model = torch.softmax(logits[b, t].double(), -1)
            p_base = torch.softmax(base_logits[b, t].double(), -1)
            if direction == "forward":
                total = total + (p_base * (p_base.log() - p_model.log())).sum()
            else:
                total = total + (p_model * (p_model.log() - p_base.log())).sum()
            count += 1
    return total / count


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_term_and_its_gradient_match_the_explicit_formula(direction):
    torch.manual_seed(0)
    options = MethodOptions(kl_weight=0.5, kl_direction=direction)
    prepared = prepare_model(tiny_model("llama"), "attn+kl", options)
    model, kl, batch = prepared.model, prepared.distiller, _batch()
    assert isinstance(kl, KLAnchor) and kl.direction == direction
    assert float(kl(model(**batch).logits, batch).detach()) == pytest.approx(0.0, abs=1e-6)
    _perturb(model)
    params = [p for p in model.parameters() if p.requires_grad]
    term = kl(model(**batch).logits, batch)
    got = torch.autograd.grad(term, params)
    logits = model(**batch).logits
    with torch.no_grad():
        base_logits = kl.base(**{k: v for k, v in batch.items() if k != "labels"}).logits
    want_term = 0.5 * _explicit_kl(logits, base_logits, batch["labels"], direction)
    want = torch.autograd.grad(want_term, params)
    assert float(term.detach()) == pytest.approx(float(want_term.detach()), rel=1e-4)
    assert float(term.detach()) > 1e-4
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.float(), rtol=1e-3, atol=1e-7)


def test_kl_ignores_prompt_and_padding_positions():
    prepared = prepare_model(tiny_model("llama"), "kl", MethodOptions(kl_weight=1.0))
    _perturb(prepared.model)
    batch = _batch()
    logits = prepared.model(**batch).logits
    kl = prepared.distiller
    before = float(kl(logits, batch))
    scrambled = logits.detach().clone()
    scrambled[:, :4] = torch.randn_like(scrambled[:, :4])  # predict prompt tokens 1..4
    scrambled[1, 8:] = torch.randn_like(scrambled[1, 8:])  # predict padding
    assert float(kl(scrambled, batch)) == pytest.approx(before, rel=1e-5)
    assert int(kl.positions(batch)) == int((batch["labels"][:, 1:] != -100).sum())
    # forward and reverse differ once the model has moved
    reverse = KLAnchor(prepared.model, 1.0, "reverse")
    reverse.base = kl.base
    assert float(reverse(logits, batch)) != pytest.approx(before, rel=1e-3)


# --- DFT --------------------------------------------------------------------------------------


def test_dft_loss_matches_its_definition_and_differs_from_ce():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7))
    labels[:, :2] = -100
    labels[1, 5:] = -100
    loss = dft_loss({"logits": logits}, labels)
    terms, weights = [], []
    for b in range(2):
        for t in range(6):
            y = labels[b, t + 1]
            if y == -100:
                continue
            logp = torch.log_softmax(logits[b, t], -1)[y]
            weights.append(float(logp.exp()))  # a constant: the weight carries no gradient
            terms.append(-logp)
    want = sum(w * term for w, term in zip(weights, terms, strict=True)) / len(terms)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    got_grad, = torch.autograd.grad(loss, logits)
    want_grad, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert float(loss) != pytest.approx(float(ce), rel=1e-2)
    # a step's count: the sum over this batch divided by the accumulated step's tokens
    assert float(dft_loss({"logits": logits}, labels, num_items_in_batch=2 * len(terms))) == \
        pytest.approx(float(want) / 2, rel=1e-5)


def test_asft_prepares_dft_and_forward_kl():
    prepared = prepare_model(tiny_model("llama"), "attn+asft")
    assert prepared.loss_func is dft_loss and isinstance(prepared.distiller, KLAnchor)
    assert prepared.distiller.direction == "forward" and prepared.distiller.weight == 0.1
    assert "DFT" in prepared.summary() and "KL(forward" in prepared.summary()
    plain = prepare_model(tiny_model("llama"), "attn")
    assert prepared.trainable_names == plain.trainable_names and plain.loss_func is None


def test_kl_options_are_validated():
    with pytest.raises(ForgetlessError, match="kl_weight"):
        MethodOptions(kl_weight=-1.0)
    with pytest.raises(ForgetlessError, match="kl_direction"):
        MethodOptions(kl_direction="sideways")
    with pytest.raises(ForgetlessError, match="ewc_samples"):
        MethodOptions(ewc_samples=0)


# --- EWC ---------------------------------------------------------------------------------------


def _examples(n: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    out = []
    for k in range(n):
        ids = torch.randint(3, VOCAB, (1, 6 + k), generator=generator)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _nll(model, example) -> float:
    """The example's mean response-token NLL in float64 (the model's own loss upcasts the
    logits to float32 only, too coarse for a finite difference)."""
    logits = model(input_ids=example["input_ids"]).logits[0, :-1].double()
    return float(F.cross_entropy(logits, example["labels"][0, 1:], ignore_index=-100))


def test_fisher_matches_finite_differences_of_each_examples_loss():
    model = tiny_model("llama").double()
    examples = _examples()
    params = [model.model.layers[1].self_attn.v_proj.weight, model.model.norm.weight]
    fisher = estimate_fisher(model, params, examples)
    assert [f.shape for f in fisher] == [p.shape for p in params]
    eps = 1e-3  # some of the forward (RoPE) stays float32: a smaller step drowns in its noise
    for tensor, estimate in zip(params, fisher, strict=True):
        for index in [(0, 0), (3, 5)] if tensor.ndim == 2 else [(0,), (7,)]:
            squares = []
            for example in examples:
                with torch.no_grad():
                    old = tensor[index].item()
                    tensor[index] = old + eps
                    up = _nll(model, example)
                    tensor[index] = old - eps
                    down = _nll(model, example)
                    tensor[index] = old
                squares.append(((up - down) / (2 * eps)) ** 2)
            want = sum(squares) / len(squares)
            assert want > 0
            assert float(estimate[index]) == pytest.approx(want, rel=2e-3)
    # the per-example squares, not the square of the mean gradient (a different quantity)
    mean_grad = sum(torch.autograd.grad(model(**e).loss, params[1])[0] for e in examples) / 3
    assert not torch.allclose(fisher[1], mean_grad.float().square(), rtol=1e-2)


@pytest.mark.parametrize("chunk", [ewc_module.CHUNK, 5])
def test_ewc_penalty_and_gradient_match_the_formula(monkeypatch, chunk):
    monkeypatch.setattr(ewc_module, "CHUNK", chunk)
    torch.manual_seed(0)
    prepared = prepare_model(tiny_model("llama"), "attn+ewc", MethodOptions(ewc_lambda=3.0))
    ewc = prepared.regularizer
    assert isinstance(ewc, EWCPenalty) and prepared.distiller is None
    assert float(ewc()) == 0.0  # no Fisher yet: no pull
    fisher = [torch.rand(p.shape) for p in ewc.params]
    ewc.set_fisher(fisher)
    assert float(ewc()) == pytest.approx(0.0, abs=1e-12)  # at θ₀
    anchors = [p.detach().clone() for p in ewc.params]
    _perturb(prepared.model)
    mean = sum(float(f.sum()) for f in fisher) / sum(f.numel() for f in fisher)
    explicit = 3.0 / 2 / mean * sum(
        (f * (p - a) ** 2).sum() for p, a, f in zip(ewc.params, anchors, fisher, strict=True))
    got = ewc()
    assert float(got) == pytest.approx(float(explicit), rel=1e-5)
    grads = torch.autograd.grad(2.0 * got, ewc.params)
    wants = torch.autograd.grad(2.0 * explicit, ewc.params)
    for g, w in zip(grads, wants, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-9)


def test_ewc_state_is_saved_and_loaded_only_when_made_the_same_way(tmp_path):
    prepared = prepare_model(tiny_model("llama"), "attn+ewc")
    ewc = prepared.regularizer
    ewc.set_fisher([torch.rand(p.shape) for p in ewc.params])
    meta = {"source": "x", "samples": 2}
    ewc.save(tmp_path / "f.safetensors", meta)
    other = prepare_model(tiny_model("llama"), "attn+ewc").regularizer
    assert not other.load(tmp_path / "f.safetensors", {"source": "x", "samples": 3})
    assert other.fisher_mean == 0.0
    assert other.load(tmp_path / "f.safetensors", meta)
    for a, b in zip(ewc.fisher, other.fisher, strict=True):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def _tokenizer():
    from transformers import AutoTokenizer

    from forgetless.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


def test_train_estimates_the_fisher_once_and_resume_keeps_it(tmp_path, monkeypatch):
    from forgetless.train import train
    from tiny_models import tiny_llama

    tokenizer = _tokenizer()
    settings = dict(tokenizer=tokenizer, method="attn+ewc", data="count_letters", limit=4,
                    batch_size=2, max_steps=2, max_length=64, learning_rate=1e-2, report_to=[],
                    save_model=False, ewc_source="largest_number", ewc_samples=3,
                    ewc_lambda=5.0, update_stats_every=None, output_dir=str(tmp_path / "run"))
    calls = []
    real = ewc_module.estimate_fisher
    monkeypatch.setattr(ewc_module, "estimate_fisher",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    first = train(model=tiny_llama(), **settings)
    saved = tmp_path / "run" / ewc_module.FISHER_FILE
    assert saved.is_file() and len(calls) == 1
    info = json.loads((tmp_path / "run" / "metrics.json").read_text())["ewc"]
    assert info["samples"] == 3 and info["source"] == "largest_number" and info["fisher_mean"] > 0
    assert 1 <= info["examples_used"] <= 3 and "loaded" not in info
    assert info["state_bytes"] == 2 * 4 * sum(
        p.numel() for n, p in first.model.named_parameters() if "self_attn" in n)
    from safetensors.torch import load_file

    stored = load_file(str(saved))
    train(model=tiny_llama(), resume=True, **settings)  # resumed: the saved Fisher, no estimate
    assert len(calls) == 1
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())["ewc"]
    assert again["loaded"] and again["fisher_mean"] == info["fisher_mean"]
    assert again["examples_used"] == info["examples_used"]
    assert load_file(str(saved)).keys() == stored.keys()
    train(model=tiny_llama(), resume=True, **{**settings, "ewc_samples": 2})  # made otherwise
    assert len(calls) == 2
    train(model=tiny_llama(), **settings)  # a fresh run estimates again
    assert len(calls) == 3


def test_ewc_source_that_cannot_be_read_fails_before_a_model_loads(tmp_path):
    from forgetless.train import train

    with pytest.raises(ForgetlessError, match="data file not found"):
        train(method="ewc", ewc_source=str(tmp_path / "missing.jsonl"),
              model="/nonexistent/model", output_dir=str(tmp_path / "run"))


def test_ewc_source_self_is_the_base_models_own_rehearsal(monkeypatch):
    """``ewc_source=self`` (the default) asks forgetless.rehearsal for n conversations of the
    base, with the held-out items excluded as mix: does."""
    from forgetless.methods import ewc

    calls = []
    conversation = [{"role": "user", "content": "Name a colour."},
                    {"role": "assistant", "content": "Blue."}]

    def fake_rehearse(model, tokenizer, n, seed, cache, excluded):
        calls.append((n, seed, len(excluded)))
        return {"conversations": [conversation] * n}

    monkeypatch.setattr(ewc, "rehearse", fake_rehearse)
    monkeypatch.setattr(ewc, "heldout_texts", lambda names: ["an excluded item"])
    ewc.check_fisher_source("self")  # registered: nothing to read before a model loads
    assert ewc.fisher_examples(object(), object(), "self", 3, 7) == [conversation] * 3
    assert calls == [(3, 7, 1)]


# --- layer freezing -----------------------------------------------------------------------------


def _trainable(prepared) -> set[str]:
    return set(prepared.trainable_names)


def _names(model, pattern: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if re.fullmatch(pattern, n)}


def test_freeze_bottom_and_layers_on_a_text_model():
    model = tiny_model("llama")  # 2 layers, embeddings tied to the head
    prepared = prepare_model(copy.deepcopy(model), "freeze-bottom:1")
    assert _trainable(prepared) == _names(model, r"model\.(layers\.1\..*|norm\.weight)")
    prepared = prepare_model(copy.deepcopy(model), "attn+freeze-bottom:1")
    assert _trainable(prepared) == _names(model, r"model\.layers\.1\.self_attn\..*")
    prepared = prepare_model(copy.deepcopy(model), "layers:0")
    assert _trainable(prepared) == _names(model, r"model\.layers\.0\..*")
    prepared = prepare_model(copy.deepcopy(model), "mlp-gate-up+layers:1-1+mofo")
    assert _trainable(prepared) == _names(model, r"model\.layers\.1\.mlp\.(gate|up)_proj\..*")
    # and a step moves exactly those
    from test_methods import changed, train_step

    before = train_step(prepared)
    assert changed(prepared.model, before) == _trainable(prepared)


def test_freeze_bottom_keeps_an_untied_head_training():
    model = tiny_model("qwen2")
    assert not model.config.tie_word_embeddings
    prepared = prepare_model(model, "freeze-bottom:1")
    assert "lm_head.weight" in _trainable(prepared)
    assert not any(n.startswith(("model.embed_tokens", "model.layers.0."))
                   for n in _trainable(prepared))


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_layers_on_a_vlm_language_model_and_with_lora(arch):
    model = tiny_model(arch)
    prepared = prepare_model(copy.deepcopy(model), "attn+freeze-bottom:1")
    assert _trainable(prepared) == _names(
        model, r"model\.language_model\.layers\.1\.self_attn\..*")
    prepared = prepare_model(copy.deepcopy(model), "layers:0-0")
    assert _trainable(prepared) == _names(model, r"model\.language_model\.layers\.0\..*")
    lora = prepare_model(copy.deepcopy(model), "lora+layers:1")
    assert lora.lora_targets and all(
        t.startswith("model.language_model.layers.1.") for t in lora.lora_targets)


@pytest.mark.parametrize("method, message", [
    ("freeze-bottom:2", "freezes 2 layers but the model has 2 decoder layers"),
    ("attn+layers:1-2", "names layer 2 but the model has 2 decoder layers"),
])
def test_a_selection_beyond_the_layer_count_is_an_error(method, message):
    with pytest.raises(ForgetlessError, match=re.escape(message)):
        prepare_model(tiny_model("llama"), method)


def test_train_checks_the_layer_count_from_the_config_before_loading(tmp_path):
    from forgetless.train import train

    # the embedded model has 30 layers: its config says so without loading any weight
    with pytest.raises(ForgetlessError, match="freezes 40 layers but the model has 30"):
        train(method="freeze-bottom:40", output_dir=str(tmp_path / "run"))


# --- plan -------------------------------------------------------------------------------------


def test_plan_counts_the_fisher_and_the_kl_copy():
    from transformers import LlamaConfig

    from forgetless.plan import plan

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    result = plan(config, ["full", "l2-anchor", "full+ewc", "attn+asft", "freeze-bottom:1"],
                  dtype="float32", update_stats=False)
    rows = {m.method: m for m in result.methods}
    trainable_bytes = 4 * rows["full"].trainable_params
    assert rows["full"].anchor_bytes == 0
    assert rows["l2-anchor"].anchor_bytes == trainable_bytes
    assert rows["full+ewc"].anchor_bytes == 2 * trainable_bytes  # θ₀ and F
    assert rows["attn+asft"].anchor_bytes == rows["full"].weights_bytes  # the base copy
    assert rows["full+freeze-bottom:1"].trainable_params < rows["full"].trainable_params


def _cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "forgetless", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_bad_layer_count_is_one_line_and_plan_counts_the_fisher():
    done = _cli("train", "method=attn+freeze-bottom:30")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "forgetless: error: method 'attn+freeze-bottom:30' on smollm2-135m: freeze-bottom:30 "
        "freezes 30 layers but the model has 30 decoder layers (N must be at most 29)"]
    done = _cli("plan", "--method", "full,full+ewc", "--json", "--no-update-stats")
    assert done.returncode == 0, done.stderr
    rows = {m["method"]: m for m in json.loads(done.stdout)["methods"]}
    assert rows["full+ewc"]["anchor_bytes"] == 2 * rows["full"]["grads_bytes"]  # θ₀ + F, fp32
    # beyond full: θ₀ + F and the penalty's own temporaries (plan.method_activation_estimate)
    assert rows["full+ewc"]["total_bytes"] == (rows["full"]["total_bytes"]
                                               + rows["full+ewc"]["anchor_bytes"]
                                               + rows["full+ewc"]["method_activation_bytes"])


def test_uses_option_says_which_methods_read_an_option():
    from forgetless.methods.registry import uses_option

    assert uses_option("asft", "kl_weight") and uses_option("attn+kl", "kl_direction")
    assert not uses_option("attn+dft", "kl_weight") and not uses_option("full", "ewc_lambda")
    assert uses_option("mlp+ewc+mofo", "ewc_samples") and uses_option("mlp+ewc+mofo", "fraction")
    assert uses_option("l1-anchor", "anchor_weight") and not uses_option("lora", "fraction")
    assert uses_option("freeze-bottom:2", "learning_rate")


def test_fisher_of_a_vlm_from_text_and_image_rows():
    """A VLM's Fisher goes through its processor (text-only rehearsal rows work) and touches
    only what trains: the language model."""
    from forgetless.data import load_examples
    from forgetless.methods.ewc import estimate_fisher_from_conversations
    from tiny_vlm import tiny_processor

    prepared = prepare_model(tiny_model("llava"), "attn+ewc")
    text = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]
    images = load_examples("count_shapes", "train")[:1]
    estimate_fisher_from_conversations(prepared.regularizer, prepared.model,
                                       tiny_processor("llava"), text + images, max_length=512)
    ewc = prepared.regularizer
    assert ewc.info["examples_used"] == 2 and ewc.fisher_mean > 0
    assert all(n.startswith("model.language_model.layers.") for n in ewc.names)


def test_compare_checks_a_layer_range_before_the_base_is_evaluated(tmp_path, monkeypatch):
    """A compare entry whose layer range is beyond the base's layers fails right after the
    base loads, before the (minutes-long) base evaluation."""
    from forgetless import compare as compare_job
    from forgetless.jobs import session
    from tiny_models import tiny_llama

    tokenizer = _tokenizer()
    monkeypatch.setattr(session.models, "load_model", lambda *a, **k: (tiny_llama(), tokenizer))
    monkeypatch.setattr(compare_job._Session, "evaluate",
                        lambda *a, **k: pytest.fail("evaluated before the method check"))
    config = {"train": {"model": "tiny", "data": "count_letters", "max_steps": 1},
              "methods": [{"name": "fb", "method": "full+freeze-bottom:9"}],
              "eval": {"suite": ["piqa"], "limit": 2}, "output_dir": str(tmp_path / "c")}
    with pytest.raises(ForgetlessError, match="freeze-bottom:9"):
        compare_job.compare(config)
