"""LwF (``+lwf``): KL(base ‖ model) on the training batch from a frozen, unshared base copy."""

from __future__ import annotations

import json

import pytest
import torch

from forgetless.errors import ForgetlessError
from forgetless.methods import METHOD_NAMES, MethodOptions, parse_method, prepare_model
from forgetless.optim import MoFO
from tiny_models import tiny_model


def _batch(vocab: int = 32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded tail must not count
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def test_names_parse_and_combine():
    assert {"lwf", "attn+lwf", "mlp-gate-up+lwf", "lora+lwf", "attn+mofo+lwf"} <= set(METHOD_NAMES)
    choice = parse_method(" LwF + attn + mofo ")
    assert choice.name == "attn+mofo+lwf" and choice.lwf and choice.mofo
    assert choice.base.name == "attn"
    assert parse_method("lwf").base.name == "full" and not parse_method("attn").lwf
    with pytest.raises(ForgetlessError, match="unknown method"):
        parse_method("lwf+lwf")
    with pytest.raises(ForgetlessError, match="lwf_weight"):
        MethodOptions(lwf_weight=-1.0)


def test_kl_is_zero_at_step_zero_and_gradients_flow_to_what_trains():
    torch.manual_seed(0)
    prepared = prepare_model(tiny_model("llama"), "attn+lwf", MethodOptions(lwf_weight=2.0))
    model, lwf, batch = prepared.model, prepared.distiller, _batch()
    assert lwf is not None and prepared.regularizer is None
    assert "LwF(weight=2.0" in prepared.summary()
    assert float(lwf(model(**batch).logits, batch)) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # move the live model: the term becomes positive
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    term = lwf(model(**batch).logits, batch)
    assert float(term) > 1e-4
    term.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in lwf.base.parameters())
    # weight scales the term linearly
    half = prepare_model(tiny_model("llama"), "attn+lwf", MethodOptions(lwf_weight=1.0))
    half.distiller.base.load_state_dict(lwf.base.state_dict())
    assert float(half.distiller(model(**batch).logits, batch)) == pytest.approx(float(term) / 2,
                                                                                 rel=1e-4)


def test_base_copy_shares_no_tensor_with_the_live_model_and_stays_put():
    torch.manual_seed(0)
    prepared = prepare_model(tiny_model("llama"), "lwf")
    model, base = prepared.model, prepared.distiller.base
    live = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not live & {t.data_ptr() for t in [*base.parameters(), *base.buffers()]}
    before = {n: t.clone() for n, t in base.state_dict().items()}
    optimizer = prepared.make_optimizer(lr=1e-2)
    for _ in range(2):
        batch = _batch()
        out = model(**batch)
        (out.loss + prepared.distiller(out.logits, batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, value in base.state_dict().items():
        assert torch.equal(value, before[name]), name  # training never reaches the copy
    assert not torch.equal(model.state_dict()["model.embed_tokens.weight"],
                           before["model.embed_tokens.weight"])
    assert not base.training and not any(p.requires_grad for p in base.parameters())


def test_lwf_combines_with_mofo_and_lora():
    prepared = prepare_model(tiny_model("llama"), "attn+mofo+lwf")
    assert isinstance(prepared.make_optimizer(lr=1e-3), MoFO)
    plain = prepare_model(tiny_model("llama"), "attn")
    assert prepared.trainable_names == plain.trainable_names
    lora = prepare_model(tiny_model("llama"), "lora+lwf")
    assert lora.distiller is not None
    assert not any("lora_" in n for n, _ in lora.distiller.base.named_parameters())
    batch = _batch()
    assert float(lora.distiller(lora.model(**batch).logits, batch)) == pytest.approx(0, abs=1e-6)


def test_train_reports_lwf_overhead(tmp_path):
    from transformers import AutoTokenizer

    from forgetless.models import resolve_model
    from forgetless.train import train
    from tiny_models import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    train(model=tiny_llama(), tokenizer=tokenizer, method="attn+lwf", data="count_letters",
          limit=4, batch_size=2, max_steps=2, max_length=64, learning_rate=1e-2, report_to=[],
          save_model=False, output_dir=str(tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    lwf = metrics["lwf"]
    assert metrics["method"] == "attn+lwf" and lwf["weight"] == 1.0 and lwf["steps"] == 2
    assert lwf["base_bytes"] > 0 and 0 < lwf["time_share"] < 1
