"""The embedded VLM builder (``llava-smollm2``) on a tiny language model and vision config:
the folder loads with transformers' Auto classes, the LM weights are bit-identical to the LM's,
the build is reproducible from its seed, and an interrupted build never looks complete."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from forgetless import models
from forgetless.errors import ForgetlessError
from forgetless.vlm import build as vlm_build
from forgetless.vlm.build import BuildSpec, ensure_built, target_folder
from tiny_models import tiny_model
from tiny_vlm import tiny_tokenizer

TINY = BuildSpec(image_size=16, patch_size=8, vision_layers=1, vision_hidden=16, vision_heads=2,
                 vision_intermediate=32, warmup_steps=2, warmup_batch=4, steps=2, batch_size=2,
                 image_token="<image>", check_pictures=4, min_accuracy=0.0)


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory) -> Path:
    """A tiny Llama with a character tokenizer holding ``<image>`` as one token."""
    folder = tmp_path_factory.mktemp("lm") / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer("llava").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(lm_folder, tmp_path_factory) -> Path:
    return ensure_built(lm_folder, tmp_path_factory.mktemp("cache"), TINY, progress=False)


def test_built_folder_loads_as_llava_with_the_lm_bit_identical(built, lm_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForImageTextToText.from_pretrained(built)
    processor = AutoProcessor.from_pretrained(built)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor" and processor.image_token == "<image>"
    lm = AutoModelForCausalLM.from_pretrained(lm_folder)
    ours = model.model.language_model.state_dict()
    for name, weight in lm.model.state_dict().items():
        assert torch.equal(ours[name], weight), name
    assert torch.equal(model.lm_head.weight, lm.lm_head.weight)
    record = json.loads((built / "forgetless_build.json").read_text())
    assert record["spec"]["seed"] == 0 and record["build_seconds"] > 0
    assert 0 <= record["check_color"] <= 1 and 0 <= record["check_shape"] <= 1  # measured
    assert record["llava_steps"] == TINY.steps  # no threshold here: no extra rounds
    # the vision side was trained: it differs from a fresh initialisation of the same seed
    fresh = vlm_build.make_model(lm, processor.tokenizer.convert_tokens_to_ids("<image>"), TINY)
    assert not torch.equal(fresh.model.multi_modal_projector.linear_1.weight,
                           model.model.multi_modal_projector.linear_1.weight)


def test_load_model_reads_the_built_folder_with_its_processor(built):
    from forgetless.vlm.examples import image_messages
    from forgetless.vlm.processors import process, render_multimodal
    from forgetless.vlm.tasks import image_task_rows

    model, processor = models.load_model(str(built))
    row = image_task_rows("name_color", "test", n=1, size=16)[0]
    text = render_multimodal(processor, image_messages(row.prompt, None, 1), True)
    batch = process(processor, [text], [[row.image]])
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 4  # (16 / 8) ** 2
    assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]


def test_reproducible_from_the_seed(built, lm_folder, tmp_path):
    again = ensure_built(lm_folder, tmp_path, TINY, progress=False)
    other = ensure_built(lm_folder, tmp_path, replace(TINY, seed=1), progress=False)
    assert again.name == built.name and other.name != built.name
    from safetensors.torch import load_file

    a, b = load_file(built / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(other / "model.safetensors")
    assert not torch.equal(a["multi_modal_projector.linear_1.weight"],
                           c["multi_modal_projector.linear_1.weight"])


def test_an_interrupted_build_never_looks_complete(lm_folder, tmp_path, monkeypatch):
    dead = tmp_path / ".build-llava-999999999-leftover"  # a killed build's half-written folder
    dead.mkdir()
    (dead / "config.json").write_text("{}")
    real = vlm_build.build

    def interrupted(lm, out, spec, progress=None):
        real(lm, out, replace(spec, steps=1), progress)  # writes a whole folder, then...
        raise KeyboardInterrupt

    monkeypatch.setattr(vlm_build, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_built(lm_folder, tmp_path, TINY, progress=False)
    assert not target_folder(tmp_path, lm_folder, TINY).exists()
    assert list(tmp_path.iterdir()) == []  # neither our temporary folder nor the dead one


def test_an_image_token_the_tokenizer_splits_is_refused(lm_folder, tmp_path):
    with pytest.raises(ValueError, match="not one token"):
        vlm_build.build(lm_folder, tmp_path, replace(TINY, image_token="<nope>"))


def test_the_alias_builds_from_the_embedded_lm(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(models, "convert_gguf", lambda gguf: tmp_path / "lm")
    monkeypatch.setattr(models, "embedded_gguf", lambda alias="smollm2-135m": Path("x.gguf"))
    monkeypatch.setattr(models, "ensure_built",
                        lambda lm, cache: calls.append((lm, cache)) or tmp_path / "vlm")
    assert models.resolve_model("llava-smollm2") == str(tmp_path / "vlm")
    assert calls == [(tmp_path / "lm", models.cache_dir() / "models")]


# --- the self-check: measure colour and shape, train more (bounded) until both are learned ---


def _stub(values: list[tuple[float, float]]):
    calls = iter(values)
    return lambda *args: dict(zip(("check_color", "check_shape"), next(calls)))


def test_check_trains_more_until_colour_and_shape_reach_the_threshold():
    rounds = []
    spec = replace(TINY, min_accuracy=0.85, more_rounds=3)
    measured = vlm_build.check_until_able(
        spec, _stub([(0.5, 0.9), (0.8, 0.9), (0.9, 0.86), (0.99, 0.99)]), rounds.append)
    assert rounds == [0, 1] and measured[-1] == {"check_color": 0.9, "check_shape": 0.86}
    assert vlm_build.check_until_able(spec, _stub([(0.9, 0.9)]), rounds.append) == [
        {"check_color": 0.9, "check_shape": 0.9}] and rounds == [0, 1]  # learned: no more


def test_check_fails_with_one_line_after_its_last_round():
    rounds = []
    spec = replace(TINY, min_accuracy=0.85, more_rounds=2)
    with pytest.raises(ForgetlessError, match="colour 50%, shape 84%.*after 2 extra rounds"):
        vlm_build.check_until_able(spec, _stub([(0.5, 0.9)] * 2 + [(0.5, 0.84)]),
                                   rounds.append)
    assert rounds == [0, 1]


def test_a_build_below_the_threshold_trains_more_and_records_its_accuracy(lm_folder, tmp_path,
                                                                          monkeypatch):
    """On the tiny model with the accuracy stubbed: low after the LLaVA stage, learned after one
    extra round, which the build trains and records."""
    monkeypatch.setattr(vlm_build, "_mc_accuracy", _stub([(0.4, 0.7), (0.9, 0.95)]))
    spec = replace(TINY, min_accuracy=0.85, more_steps=1, more_rounds=3)
    record = json.loads((ensure_built(lm_folder, tmp_path, spec, progress=False)
                         / "forgetless_build.json").read_text())
    assert record["llava_steps"] == TINY.steps + 1
    assert (record["check_color"], record["check_shape"]) == (0.9, 0.95)
    assert [c["check_color"] for c in record["checks"]] == [0.4, 0.9]


def test_a_build_that_never_learns_fails_and_leaves_nothing(lm_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(vlm_build, "_mc_accuracy", _stub([(0.2, 0.3)] * 3))
    spec = replace(TINY, min_accuracy=0.85, more_steps=1, more_rounds=2)
    with pytest.raises(ForgetlessError, match="did not learn its pictures"):
        ensure_built(lm_folder, tmp_path, spec, progress=False)
    assert list(tmp_path.iterdir()) == []
