"""Methods select exactly the intended parameters on every architecture, and train only those."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from forgetless.errors import ForgetlessError
from forgetless.methods import (
    METHOD_NAMES,
    Method,
    MethodOptions,
    merge_lora,
    parse_method,
    prepare_model,
    registry,
)
from forgetless.optim import MoFO
from tiny_models import TINY_ARCHS, VOCAB, tiny_model

_MODELS: dict[str, torch.nn.Module] = {}


def fresh(arch: str) -> torch.nn.Module:
    """A private copy of the tiny model (building once per arch keeps the file fast)."""
    if arch not in _MODELS:
        _MODELS[arch] = tiny_model(arch)
    return copy.deepcopy(_MODELS[arch])


# Expected trainable projections, written out per layout rather than derived from the code.
_STANDARD = {
    "attn": (r"self_attn\.(q|k|v|o)_proj", 4),
    "attn-qkv": (r"self_attn\.(q|k|v)_proj", 3),
    "mlp": (r"mlp\.(gate|up|down)_proj", 3),
    "mlp-gate-up": (r"mlp\.(gate|up)_proj", 2),
}
_PHI3 = {
    "attn": (r"self_attn\.(qkv|o)_proj", 2),
    "attn-qkv": (r"self_attn\.qkv_proj", 1),
    "mlp": (r"mlp\.(gate_up|down)_proj", 2),
    "mlp-gate-up": (r"mlp\.gate_up_proj", 1),
}
_GPT2 = {
    "attn": (r"attn\.(c_attn|c_proj)", 2),
    "attn-qkv": (r"attn\.c_attn", 1),
    "mlp": (r"mlp\.(c_fc|c_proj)", 2),
    "mlp-gate-up": (r"mlp\.c_fc", 1),  # no gate: the up projection, with c_proj (down) frozen
}
LAYOUTS = {
    "llama": (r"model\.layers\.\d\.", _STANDARD),
    "qwen2": (r"model\.layers\.\d\.", _STANDARD),
    "mistral": (r"model\.layers\.\d\.", _STANDARD),
    "gemma": (r"model\.layers\.\d\.", _STANDARD),
    "phi3": (r"model\.layers\.\d\.", _PHI3),
    "gpt2": (r"transformer\.h\.\d\.", _GPT2),
    "llava": (r"model\.language_model\.layers\.\d\.", _STANDARD),
    "qwen2_5_vl": (r"model\.language_model\.layers\.\d\.", _STANDARD),
}
VISION = re.compile(r"model\.(vision_tower|multi_modal_projector|visual)\.")
PRESETS = ["attn", "attn-qkv", "mlp", "mlp-gate-up"]
N_LAYERS = 2


def expected_preset(model: torch.nn.Module, arch: str, method: str) -> set[str]:
    layer, table = LAYOUTS[arch]
    projection, per_layer = table[method]
    pattern = re.compile(layer + projection + r"\.(weight|bias)")
    names = {n for n, _ in model.named_parameters() if pattern.fullmatch(n)}
    modules = {n.rsplit(".", 1)[0] for n in names}
    assert len(modules) == per_layer * N_LAYERS  # the pattern itself is not vacuous
    return names


def train_step(prepared, lr: float = 1e-2) -> dict[str, torch.Tensor]:
    """One optimizer step on random tokens; returns the parameters from before the step."""
    model = prepared.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = prepared.make_optimizer(lr=lr, weight_decay=0.1)
    ids = torch.randint(3, VOCAB - 8, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    if prepared.regularizer is not None:
        loss = loss + prepared.regularizer(model)
    loss.backward()
    optimizer.step()
    return before


def changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", PRESETS)
def test_preset_trains_exactly_its_projections(arch, method):
    model = fresh(arch)
    prepared = prepare_model(model, method)
    expected = expected_preset(model, arch, method)
    assert set(prepared.trainable_names) == expected
    assert prepared.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < prepared.share < 1
    before = train_step(prepared)
    assert changed(prepared.model, before) == expected  # frozen ones are bit-identical


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_full_trains_the_whole_language_model_only(arch):
    model = fresh(arch)
    prepared = prepare_model(model, "full")
    names = {n for n, _ in model.named_parameters()}
    language = {n for n in names if not VISION.match(n)}
    assert set(prepared.trainable_names) == language
    if arch in ("llava", "qwen2_5_vl"):
        assert language != names and "lm_head.weight" in language
    before = train_step(prepared)
    assert changed(model, before) == language


def test_mlp_gate_up_freezes_down_embeddings_norms_and_head():
    for arch in ("llama", "qwen2", "phi3", "gpt2", "qwen2_5_vl"):  # tied and untied heads
        prepared = prepare_model(fresh(arch), "mlp-gate-up")
        model = prepared.model
        assert not model.get_output_embeddings().weight.requires_grad
        assert not model.get_input_embeddings().weight.requires_grad
        for name, param in model.named_parameters():
            if re.search(r"down_proj|mlp\.c_proj|norm|ln_|wpe", name):
                assert not param.requires_grad, name


@pytest.mark.parametrize("method", ["mofo", "attn+mofo", "mlp-gate-up+mofo", "lora+mofo"])
def test_mofo_combinations_use_mofo_on_the_method_parameters(method):
    options = MethodOptions(fraction=0.25)
    prepared = prepare_model(fresh("qwen2"), method, options)
    optimizer = prepared.make_optimizer(lr=1e-2)
    assert isinstance(optimizer, MoFO)
    assert optimizer.defaults["fraction"] == 0.25
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in prepared.model.parameters() if p.requires_grad}
    assert optimized == trainable
    base = parse_method(method).base.name
    if base == "full":
        assert prepared.trainable == prepared.total
    before = train_step(prepared)
    moved = changed(prepared.model, before)
    assert moved and moved <= set(prepared.trainable_names)
    # MoFO moves only about `fraction` of each matrix's entries per step.
    matrices = [(p, before[n]) for n, p in prepared.model.named_parameters() if n in moved]
    matrices = [(p, b) for p, b in matrices if p.ndim == 2]
    share = sum((p != b).sum().item() for p, b in matrices) / sum(p.numel() for p, _ in matrices)
    assert 0 < share <= 0.3


def test_adamw_without_mofo_and_no_decay_on_vectors():
    prepared = prepare_model(fresh("qwen2"), "attn")
    optimizer = prepared.make_optimizer(lr=1e-3, weight_decay=0.05, betas=(0.8, 0.9), eps=1e-6)
    assert type(optimizer) is torch.optim.AdamW
    for group in optimizer.param_groups:
        dims = {p.ndim for p in group["params"]}
        assert group["weight_decay"] == (0.05 if dims == {2} else 0.0)
        assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
    assert {1, 2} == {p.ndim for g in optimizer.param_groups for p in g["params"]}  # q/k/v bias


@pytest.mark.parametrize("norm", [2, 1])
def test_anchor_penalty_is_zero_at_start_and_measures_drift(norm):
    model = fresh("llama")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    options = MethodOptions(anchor_weight=0.5)
    prepared = prepare_model(model, f"l{norm}-anchor", options)
    assert prepared.trainable == prepared.total
    assert len(prepared.regularizer.anchors) == len(prepared.trainable_names)
    assert prepared.regularizer(model).item() == 0.0
    train_step(prepared)
    drift = sum(
        ((p - start[n]).pow(2) if norm == 2 else (p - start[n]).abs()).sum()
        for n, p in model.named_parameters()
    )
    penalty = prepared.regularizer(model)
    assert penalty.item() > 0
    torch.testing.assert_close(penalty, 0.5 * drift)
    penalty.backward()  # differentiable, so it pulls the weights back
    assert all(p.grad is not None for p in model.parameters())


def test_anchor_only_copies_trainable_parameters():
    prepared = prepare_model(fresh("llava"), "l2-anchor+mofo")
    anchored = sum(a.numel() for a in prepared.regularizer.anchors)
    assert anchored == prepared.trainable < prepared.total
    assert isinstance(prepared.make_optimizer(lr=1e-3), MoFO)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_lora_targets_language_model_projections(arch):
    model = fresh(arch)
    prepared = prepare_model(model, "lora", MethodOptions(lora_r=2))
    per_layer = {"phi3": 4, "gpt2": 4}.get(arch, 7)  # fused layouts have fewer modules
    assert len(prepared.lora_targets) == per_layer * N_LAYERS
    assert not any(VISION.match(name) for name in prepared.lora_targets)
    assert prepared.trainable_names and all("lora_" in n for n in prepared.trainable_names)
    before = train_step(prepared)
    moved = changed(prepared.model, before)
    lora_b = {n for n in prepared.trainable_names if "lora_B" in n}
    assert lora_b and lora_b <= moved <= set(prepared.trainable_names)


def test_lora_targets_option_stays_inside_the_language_model():
    # CLIP's vision layers also have q_proj; only the language model's two may be wrapped.
    prepared = prepare_model(fresh("llava"), "lora", MethodOptions(lora_targets=["q_proj"]))
    assert prepared.lora_targets == [
        f"model.language_model.layers.{i}.self_attn.q_proj" for i in range(N_LAYERS)
    ]
    preset = prepare_model(fresh("phi3"), "lora", MethodOptions(lora_targets="mlp-gate-up"))
    assert preset.lora_targets == [f"model.layers.{i}.mlp.gate_up_proj" for i in range(N_LAYERS)]
    with pytest.raises(ForgetlessError, match="match no module of the language model"):
        prepare_model(fresh("llama"), "lora", MethodOptions(lora_targets=["no_such_proj"]))


def test_merge_lora_gives_the_plain_model_with_the_same_outputs():
    prepared = prepare_model(fresh("llama"), "lora")
    train_step(prepared, lr=0.05)
    ids = torch.randint(3, VOCAB - 8, (1, 10))
    with torch.no_grad():
        adapted = prepared.model(input_ids=ids).logits
        merged = merge_lora(prepared.model)
        plain = merged(input_ids=ids).logits
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(plain, adapted, rtol=1e-4, atol=1e-5)
    untouched = fresh("gpt2")
    assert merge_lora(untouched) is untouched


def test_method_names_and_parsing():
    for name in ["full", "lora", "attn", "attn-qkv", "mlp", "mlp-gate-up", "l2-anchor", "mofo"]:
        assert name in METHOD_NAMES
    assert {"attn+mofo", "lora+mofo", "mlp-gate-up+mofo", "l1-anchor"} <= set(METHOD_NAMES)
    assert parse_method("mofo").base.name == "full" and parse_method("mofo").mofo
    assert parse_method(" Attn + MoFO ").name == "attn+mofo"
    assert not parse_method("attn").mofo


@pytest.mark.parametrize("bad", ["adam", "attn+lora", "mofo+mofo", "", "attn+"])
def test_unknown_method_lists_valid_names(bad):
    with pytest.raises(ForgetlessError, match=r"unknown method .*valid: .*attn-qkv.*mlp-gate-up"):
        parse_method(bad)
    with pytest.raises(ForgetlessError, match="unknown method"):
        prepare_model(fresh("llama"), bad)


def test_options_are_validated():
    with pytest.raises(ForgetlessError, match="fraction"):
        MethodOptions(fraction=0.0)
    with pytest.raises(ForgetlessError, match="lora_r"):
        MethodOptions(lora_r=0)
    with pytest.raises(ForgetlessError, match="anchor_weight"):
        MethodOptions(anchor_weight=-1.0)
    prepared = prepare_model(fresh("llama"), "attn+mofo", MethodOptions(mofo_filter="nope"))
    with pytest.raises(ForgetlessError, match="attn\\+mofo"):
        prepared.make_optimizer(lr=1e-3)


@pytest.fixture
def custom_methods(monkeypatch):
    """Temporarily register splits no shipped preset asks for, to exercise the error paths."""
    methods = dict(registry._METHODS)
    monkeypatch.setattr(registry, "_METHODS", methods)
    registry.register_method(Method("attn-q", "query only", frozenset("q")))
    registry.register_method(Method("mlp-gate", "gate only", frozenset({"gate"})))


@pytest.mark.usefixtures("custom_methods")
def test_split_of_a_fused_projection_is_an_error():
    with pytest.raises(ForgetlessError, match=r"attn-q.*Phi3ForCausalLM.*qkv_proj fuses k\+q\+v"):
        prepare_model(fresh("phi3"), "attn-q")
    with pytest.raises(ForgetlessError, match=r"GPT2LMHeadModel.*c_attn fuses"):
        prepare_model(fresh("gpt2"), "attn-q")
    with pytest.raises(ForgetlessError, match=r"gate_up_proj fuses gate\+up"):
        prepare_model(fresh("phi3"), "mlp-gate+mofo")
    prepared = prepare_model(fresh("llama"), "attn-q")
    assert all(".q_proj." in n for n in prepared.trainable_names)


@pytest.mark.usefixtures("custom_methods")
def test_preset_matching_nothing_is_an_error_not_full_tuning():
    model = fresh("gpt2")  # an ungated MLP has no gate projection at all
    with pytest.raises(ForgetlessError, match=r"mlp-gate.*GPT2LMHeadModel.*matched no modules"):
        prepare_model(model, "mlp-gate")
    assert all(p.requires_grad for p in model.parameters())  # left untouched


def test_unrecognised_projection_names_are_an_error():
    model = fresh("llama")
    for layer in model.model.layers:
        layer.mlp.w_in = layer.mlp.up_proj  # an unknown naming scheme
        del layer.mlp.up_proj
    with pytest.raises(
        ForgetlessError, match=r"'mlp' on LlamaForCausalLM: no up projection.*up_proj"
    ):
        prepare_model(model, "mlp")
    with pytest.raises(ForgetlessError, match="found no decoder layers"):
        prepare_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), "attn")


def test_summary_is_one_line():
    summary = prepare_model(fresh("llava"), "attn+mofo").summary()
    assert "\n" not in summary
    assert (
        "attn+mofo" in summary and "LlavaForConditionalGeneration" in summary and "MoFO" in summary
    )


def test_vision_side_is_skipped_when_get_decoder_returns_the_multimodal_base(monkeypatch):
    model = fresh("llava")
    monkeypatch.setattr(model, "get_decoder", lambda: model.model)  # as some VLM classes do
    prepared = prepare_model(model, "full")
    assert prepared.trainable_names and not any(VISION.match(n) for n in prepared.trainable_names)


@pytest.mark.parametrize("exact", [False, True])
def test_mofo_options_reach_the_optimizer(exact):
    options = MethodOptions(fraction=0.2, mofo_filter="gradient", mofo_exact=exact)
    optimizer = prepare_model(fresh("llama"), "mofo", options).make_optimizer(lr=1e-3)
    for group in optimizer.param_groups:
        assert group["fraction"] == 0.2 and group["filter"] == "gradient"
        assert group["exact"] is exact
