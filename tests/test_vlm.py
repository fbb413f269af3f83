"""Vision-language models through the same layers as text models: loading (model + processor),
image-text data and its collator, every method family on the language side with the vision
tower and projector frozen (or trained when unfrozen), evaluation with images, and bad images
as one-line errors before any model loads. Tiny random LLaVA and Qwen2.5-VL, 16-pixel images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from forgetless.data import build_dataset, load_examples
from forgetless.errors import ForgetlessError
from forgetless.methods import MethodOptions, prepare_model
from forgetless.methods.layout import multimodal_parts
from forgetless.models import load_model
from forgetless.vlm.collator import ImageTextCollator
from forgetless.vlm.examples import IGNORE_INDEX, Example, image_messages
from forgetless.vlm.processors import is_processor, text_tokenizer
from tiny_models import tiny_model
from tiny_vlm import tiny_processor, tiny_vlm_folder

VLM_ARCHS = ["llava", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A data folder: two small PNGs, a broken one, and rows in both image row forms."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "img").mkdir()
    Image.new("RGB", (20, 20), "red").save(folder / "img" / "red.png")
    Image.new("RGB", (24, 16), "blue").save(folder / "img" / "blue.png")
    (folder / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [
        {"image": "img/red.png", "prompt": "Color?", "response": "red"},
        {"images": ["img/blue.png", "img/red.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "Colors?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "blue, red"}]}]},
        {"prompt": "No image here", "response": "ok"},
    ]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return folder


def _parts_snapshot(model) -> dict[str, list[torch.Tensor]]:
    return {key: [p.detach().clone() for p in params]
            for key, params in multimodal_parts(model).items()}


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --- loading ------------------------------------------------------------------------------


def test_load_model_gives_a_vlm_and_its_processor(tmp_path):
    folder = tiny_vlm_folder(tmp_path / "llava")
    model, processor = load_model(str(folder), dtype="float32", device="cpu",
                                  attn_implementation="eager")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert is_processor(processor) and not is_processor(text_tokenizer(processor))
    assert text_tokenizer(processor).pad_token is not None
    assert text_tokenizer(text_tokenizer(processor)) is text_tokenizer(processor)


# --- methods ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", VLM_ARCHS)
@pytest.mark.parametrize("method", ["full", "attn", "attn-qkv", "mlp", "mlp-gate-up", "lora",
                                    "mofo", "attn+mofo", "l2-anchor"])
def test_every_method_trains_the_language_side_only(arch, method):
    prepared = prepare_model(tiny_model(arch), method, MethodOptions())
    parts = multimodal_parts(prepared.model)
    assert parts["vision"] and parts["projector"]
    assert not any(p.requires_grad for params in parts.values() for p in params)
    assert prepared.parts["language"] == prepared.trainable > 0
    assert "vision frozen, projector frozen" in prepared.summary()


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_freeze_flags_unfreeze_vision_and_projector(arch):
    options = MethodOptions(freeze_vision_tower=False, freeze_multi_modal_projector=False,
                            freeze_language_model=True)
    prepared = prepare_model(tiny_model(arch), "attn", options)
    parts = multimodal_parts(prepared.model)
    assert all(p.requires_grad for params in parts.values() for p in params)
    assert prepared.parts["language"] == 0
    assert prepared.parts["vision"] > 0 and prepared.parts["projector"] > 0
    assert "language frozen" in prepared.summary()


def _other_vlm(arch: str):
    """Tiny Idefics3 (SmolVLM), LLaVA-OneVision and Qwen2-VL: structure only (no processor)."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=16, patch_size=8)
    torch.manual_seed(0)
    if arch == "idefics3":
        return Idefics3ForConditionalGeneration(Idefics3Config(
            text_config=dict(model_type="llama", **text), vision_config=vision,
            image_token_id=127, scale_factor=1))
    if arch == "llava_onevision":
        return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", **text),
            vision_config=dict(model_type="siglip_vision_model", **vision),
            image_token_index=127, video_token_index=126))
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]}
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=dict(rope_parameters=rope, **text),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4,
                           spatial_merge_size=2)))


@pytest.mark.parametrize("arch", ["idefics3", "llava_onevision", "qwen2_vl"])
def test_other_vlm_families_split_into_language_vision_projector(arch):
    prepared = prepare_model(_other_vlm(arch), "attn", MethodOptions())
    assert prepared.parts["language"] == prepared.trainable > 0
    assert prepared.parts["vision"] == prepared.parts["projector"] == 0
    unfrozen = prepare_model(_other_vlm(arch), "attn", MethodOptions(
        freeze_vision_tower=False, freeze_multi_modal_projector=False))
    assert unfrozen.parts["vision"] > 0 and unfrozen.parts["projector"] > 0


def test_freeze_flags_refuse_what_cannot_work():
    with pytest.raises(ForgetlessError, match="no vision tower"):
        prepare_model(tiny_model("llama"), "attn", MethodOptions(freeze_vision_tower=False))
    with pytest.raises(ForgetlessError, match="nothing trains"):
        prepare_model(tiny_model("llava"), "full", MethodOptions(freeze_language_model=True))
    with pytest.raises(ForgetlessError, match="not supported"):
        prepare_model(tiny_model("llava"), "lora",
                      MethodOptions(freeze_multi_modal_projector=False))


# --- data ---------------------------------------------------------------------------------


def test_image_rows_both_forms_paths_relative_to_the_file(images):
    examples = load_examples(str(images / "train.jsonl"))
    assert [len(e.images) for e in examples] == [1, 2, 0]
    assert examples[0].images[0] == images / "img" / "red.png"
    assert examples[0].messages == image_messages("Color?", "red")
    assert examples[2].messages[0]["content"] == "No image here"


@pytest.mark.parametrize("row, message", [
    ({"image": "img/missing.png", "prompt": "a", "response": "b"}, "image not found"),
    ({"image": "img/broken.png", "prompt": "a", "response": "b"}, "unreadable image"),
    ({"images": ["img/red.png"], "messages": [
        {"role": "user", "content": "no image part"},
        {"role": "assistant", "content": "x"}]}, "1 image"),
    ({"images": "img/red.png", "messages": [{"role": "user", "content": [{"type": "video"}]},
                                            {"role": "assistant", "content": "x"}]},
     "content part"),
    ({"images": [3], "prompt": "a", "response": "b"}, "list of file paths"),
])
def test_bad_image_rows_name_file_and_row(images, row, message):
    path = images / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "response": "row"}) + "\n" + json.dumps(row))
    with pytest.raises(ForgetlessError, match=message) as err:
        load_examples(str(path))
    assert str(err.value).startswith(f"{path}:2: ")


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_collator_puts_loss_on_assistant_tokens_only(arch, images):
    processor = tiny_processor(arch)
    examples = build_dataset(processor, str(images / "train.jsonl"), seed=0)
    batch = ImageTextCollator(processor, max_length=512)(examples)
    tokenizer = text_tokenizer(processor)
    for row in range(len(examples)):
        targets = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        answer = examples[row].messages[-1]["content"]
        answer = answer if isinstance(answer, str) else answer[0]["text"]
        assert tokenizer.decode(targets).startswith(answer)  # + the template's newline
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    assert (batch["input_ids"] == image_id).any()
    assert not (batch["labels"] == image_id).any()
    with pytest.raises(ForgetlessError, match="image tokens"):
        ImageTextCollator(processor, max_length=8)(examples)


def test_image_data_needs_a_vlm(images):
    from tiny_vlm import tiny_tokenizer

    with pytest.raises(ForgetlessError, match="vision-language model"):
        build_dataset(tiny_tokenizer("llava"), str(images / "train.jsonl"))


# --- training -----------------------------------------------------------------------------


def _train(arch: str, method: str, data: str, out: Path, **overrides):
    from forgetless.train import train

    return train(model=tiny_model(arch).train(), tokenizer=tiny_processor(arch), data=data,
                 method=method, max_steps=1, batch_size=3, learning_rate=1e-2,
                 output_dir=str(out), report_to=[], device="cpu", dtype="float32",
                 save_model=False, logging_steps=1, **overrides)


@pytest.mark.parametrize("arch, method", [
    ("llava", "full"), ("llava", "attn+mofo"), ("llava", "lora"), ("llava", "l2-anchor"),
    ("qwen2_5_vl", "mlp-gate-up"), ("llava", "attn+asft"), ("qwen2_5_vl", "freeze-bottom:1"),
    ("llava", "mlp+ewc"),
])
def test_one_step_with_images_keeps_vision_and_projector(arch, method, images, tmp_path):
    base = _parts_snapshot(tiny_model(arch))
    # +ewc: its Fisher from the same image rows, through the processor
    extra = {"ewc_source": str(images / "train.jsonl"), "ewc_samples": 2} if "ewc" in method else {}
    result = _train(arch, method, str(images / "train.jsonl"), tmp_path, **extra)
    assert result.metrics["steps"] == 1 and result.metrics["first_loss"] > 0
    after = _parts_snapshot(result.model)
    assert _same(base["vision"], after["vision"]) and _same(base["projector"], after["projector"])


def test_unfrozen_vision_and_projector_train(images, tmp_path):
    base = _parts_snapshot(tiny_model("llava"))
    result = _train("llava", "attn", str(images / "train.jsonl"), tmp_path,
                    freeze_vision_tower=False, freeze_multi_modal_projector=False)
    after = _parts_snapshot(result.model)
    assert not _same(base["vision"], after["vision"])
    assert not _same(base["projector"], after["projector"])


def test_bad_image_is_one_line_exit_2_before_the_model_loads(images, tmp_path, monkeypatch,
                                                              capsys):
    from forgetless import cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr("forgetless.train.load_model", no_load)
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"image": "nowhere.png", "prompt": "a", "response": "b"}) + "\n")
    folder = tiny_vlm_folder(tmp_path / "llava")
    capsys.readouterr()  # saving the folder's progress bars
    monkeypatch.setattr(sys, "argv", ["forgetless", "train", f"model={folder}", f"data={data}",
                                      f"output_dir={tmp_path / 'run'}", "max_steps=1"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"forgetless: error: {data}:1: image not found: {tmp_path / 'nowhere.png'}"]


def test_text_rows_train_a_vlm_through_its_processor(tmp_path):
    rows = tmp_path / "text.jsonl"
    rows.write_text(json.dumps({"prompt": "2+2?", "response": "4"}) + "\n")
    result = _train("llava", "attn", str(rows), tmp_path / "run")
    assert result.metrics["steps"] == 1


def test_example_holds_pil_images():
    example = Example(image_messages("q?", "a"), [Image.new("RGB", (8, 8))])
    batch = ImageTextCollator(tiny_processor("llava"))([example])
    assert batch["pixel_values"].shape[0] == 1


# --- evaluation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_task(images) -> Path:
    """A user MC image task (YAML + rows, image paths relative to the task file)."""
    rows = [{"pic": "img/red.png", "q": "Color?", "options": ["red", "blue"], "answer": 0},
            {"pic": "img/blue.png", "q": "Color?", "options": ["red", "blue"], "answer": 1}]
    (images / "colors.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (images / "colors.yaml").write_text(
        "name: colors\ndata_files: {test: colors.jsonl}\ntext: '{{q}}'\nchoices: options\n"
        "gold: answer\nimage: pic\nmetrics: [acc]\n")
    return images / "colors.yaml"


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_image_mc_task_scores_choices_with_the_image(arch, image_task):
    """Each choice's log-likelihood equals a hand-built forward pass over processor inputs."""
    from forgetless.eval import evaluate
    from forgetless.vlm.examples import image_messages
    from forgetless.vlm.processors import process, render_multimodal

    model, processor = tiny_model(arch), tiny_processor(arch)
    result = evaluate(model, processor, suite=[str(image_task)], limit=None)
    assert result.metrics["colors/acc"].n == 2
    record = result.per_item["colors"][0]
    prompt = render_multimodal(processor, image_messages("Color?", None), True)
    image = Image.open(image_task.parent / "img" / "red.png").convert("RGB")
    head = process(processor, [prompt], [[image]])["input_ids"].shape[1]
    whole = process(processor, [prompt + "blue"], [[image]])
    with torch.no_grad():
        logits = model(**whole).logits.log_softmax(-1)[0]
    ids = whole["input_ids"][0]
    expected = sum(float(logits[i - 1, ids[i]]) for i in range(head, len(ids)))
    assert record["loglikelihoods"][1] == pytest.approx(expected, abs=1e-3)


def test_image_task_needs_a_processor(image_task):
    from forgetless.eval import evaluate
    from tiny_vlm import tiny_tokenizer

    with pytest.raises(ForgetlessError, match="needs a vision-language model"):
        evaluate(tiny_model("llava"), tiny_tokenizer("llava"), suite=[str(image_task)])


def test_bad_image_in_a_task_is_one_line(images, tmp_path):
    from forgetless.eval import load_spec, load_task

    (tmp_path / "t.jsonl").write_text(json.dumps({"pic": "gone.png", "o": ["a"], "g": 0}) + "\n")
    (tmp_path / "t.yaml").write_text("name: t\ndata_files: {test: t.jsonl}\ntext: q\n"
                                     "choices: o\ngold: g\nimage: pic\n")
    with pytest.raises(ForgetlessError, match=r"task 't' row t:0: image not found"):
        load_task(load_spec(str(tmp_path / "t.yaml")))


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_image_target_generates_and_drift_uses_images(arch, image_task):
    """Greedy generation + exact match on an image target (HH:MM answers), answer NLL, and
    drift on image prompts (a model against itself: KL 0, full agreement)."""
    from forgetless.eval import Target, evaluate
    from forgetless.eval.targets import _image_task_rows, extract_clock

    rows = _image_task_rows("read_clock")()[:3]
    target = Target("clock3", load=lambda: rows, extract=extract_clock, max_new_tokens=4)
    model, processor = tiny_model(arch), tiny_processor(arch)
    result = evaluate(model, processor, suite=[str(image_task)], target=target, limit=None,
                      base_model=tiny_model(arch), batch_size=2)
    records = result.per_item["clock3"]
    assert [r["gold"] for r in records] == [r.answer for r in rows]
    assert all(len(r["gold"]) == 5 and r["tokens"] > 0 for r in records)
    assert result.metrics["clock3/answer_nll"].value > 0
    assert result.metrics["drift/kl"].value == pytest.approx(0.0, abs=1e-6)
    assert result.metrics["drift/top1_agreement"].value == 1.0
    assert result.provenance["drift_prompts_n"] == 2


def test_drift_leaves_image_positions_out_and_sees_a_changed_model(image_task):
    from forgetless.eval import kl_and_number_mass

    processor = tiny_processor("llava")
    picture = Image.open(image_task.parent / "img" / "red.png")
    prompts = [("Color?", [picture]), "plain text prompt"]
    drift = kl_and_number_mass(tiny_model("llava", seed=1), tiny_model("llava"), processor,
                               prompts, batch_size=1)
    assert drift["kl"].value > 0 and drift["kl"].n == 2
    with pytest.raises(ForgetlessError, match="processor"):
        kl_and_number_mass(tiny_model("llava"), tiny_model("llava"),
                           processor.tokenizer, prompts[:1])


def test_extract_clock():
    from forgetless.eval.targets import extract_clock

    assert extract_clock("It is 3:05.") == "03:05"
    assert extract_clock("09:45") == "09:45"
    assert extract_clock("no time") == "no time"


def test_builtin_image_task_is_an_mc_task_and_a_target(tmp_path, monkeypatch):
    from forgetless.eval import get_target, load_spec, load_task

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path))
    loaded = load_task(load_spec("name_shape"), limit=5)
    assert len(loaded.items) == 5 and all(len(item.images) == 1 for item in loaded.items)
    assert [len(item.requests) for item in loaded.items] == [4] * 5
    again = load_task(load_spec("name_shape"), limit=5)  # drawn once, read from the cache
    assert again.files == loaded.files
    rows = get_target("count_shapes").load()
    assert rows and all(len(row.images) == 1 and row.answer.isdigit() for row in rows)


# --- jobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_text_tasks_score_on_a_vlm_like_a_text_model(arch):
    """Text-only held-out tasks on a VLM: the shared-context (KV cache) path agrees with the
    one-sequence-per-request reference (Qwen2.5-VL's 3-D rope positions included)."""
    from forgetless.eval import score_requests

    requests = [("The sky is", " blue"), ("The sky is", " green"), ("1 2 3", " 4 5")]
    model, processor = tiny_model(arch), tiny_processor(arch)
    shared = score_requests(model, text_tokenizer(processor), requests, batch_size=2)
    alone = score_requests(model, text_tokenizer(processor), requests, share_context=False)
    assert shared == pytest.approx(alone, abs=1e-4)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return tiny_vlm_folder(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def image_target(images) -> Path:
    rows = [{"image": "img/red.png", "prompt": "Color?", "response": "red"},
            {"image": "img/blue.png", "prompt": "Color?", "response": "blue"}]
    (images / "target.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return images / "target.jsonl"


def test_compare_tunes_and_evaluates_a_vlm(tmp_path, llava_dir, images, image_target,
                                          monkeypatch):
    from forgetless.compare import compare
    from forgetless.eval import Target, register_target
    from forgetless.eval.targets import load_jsonl_rows

    # A registered name: a target given as a file path becomes an MLflow metric name that
    # MLflow refuses (the path's slashes), a compare bug independent of images.
    register_target(Target("colors_target", load=lambda: load_jsonl_rows(image_target)))
    # A built-in image task in the suite: compare's report keys tasks by their suite entry, so
    # a task .yaml path there is another compare bug independent of images.
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    config = {
        "train": dict(model=str(llava_dir), data=str(images / "train.jsonl"), batch_size=3,
                      max_steps=1, learning_rate=1e-2, report_to=[], logging_steps=1,
                      device="cpu"),
        "methods": ["attn"],
        "eval": dict(suite=["name_color"], limit=2, target="colors_target",
                     target_limit=2, batch_size=2, drift_prompts=2),
        "interpolate": [],
        "output_dir": str(tmp_path / "cmp"),
    }
    compare(config)
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    attn = results["methods"][0]
    assert attn["heldout"]["name_color"]["delta"]["n"] == 2
    assert results["sample_sizes"]["colors_target"] == 2
    assert results["sample_sizes"]["drift_prompts"] == 2
    assert (tmp_path / "cmp" / "runs" / "attn" / "model" / "processor_config.json").is_file()


def test_eval_and_check_commands_take_a_vlm(tmp_path, llava_dir, image_task, image_target,
                                            monkeypatch, capsys):
    from forgetless import cli
    from forgetless.check import check

    out = tmp_path / "eval.json"
    monkeypatch.setattr(sys, "argv", [
        "forgetless", "eval", "--model", str(llava_dir), "--base", str(llava_dir), "--suite",
        str(image_task), "--target", str(image_target), "--device", "cpu", "--output", str(out)])
    try:  # success returns or exits 0 (cli.main only calls sys.exit for a non-zero code)
        code = cli.main()
    except SystemExit as done:
        code = done.code
    assert code in (0, None), capsys.readouterr().err
    metrics = json.loads(out.read_text())["metrics"]
    assert {"colors/acc", f"{image_target}/exact_match", "drift/kl"} <= set(metrics)
    result = check(str(llava_dir), str(llava_dir), suite=[str(image_task)], limit=2,
                   device="cpu")
    assert result.passed and result.rows[0].change == 0.0


def test_continual_runs_a_vlm_through_image_stages(tmp_path, llava_dir, images, image_target,
                                                   monkeypatch):
    from forgetless.continual import continual

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    stage = {"name": "colors", "data": str(images / "train.jsonl"), "target": str(image_target)}
    config = {"model": str(llava_dir), "tasks": [stage, {**stage, "name": "again"}],
              "methods": ["attn"],
              "train": {"max_steps": 1, "batch_size": 3, "learning_rate": 1e-2, "report_to": [],
                        "logging_steps": 1, "device": "cpu"},
              "eval": {"suite": ["name_color"], "limit": 2, "target_limit": 2, "batch_size": 2},
              "output_dir": str(tmp_path / "out")}
    continual(config)
    summary = json.loads((tmp_path / "out" / "continual.json").read_text())
    assert len(summary["methods"]["attn"]["R"]) == 3  # base + two stages


def test_saved_vlm_lora_adapter_reloads_with_its_processor(tmp_path, llava_dir):
    """A LoRA run on a VLM folder trained on a built-in image task: the adapter folder loads
    back on its base as an image-text model with the processor."""
    from forgetless.train import train

    result = train(model=str(llava_dir), data="name_shape", limit=3, method="lora",
                   max_steps=1, batch_size=3, output_dir=str(tmp_path / "run"), report_to=[],
                   device="cpu")
    assert (result.model_dir / "adapter_config.json").is_file()
    model, processor = load_model(str(result.model_dir), device="cpu")
    assert type(model.get_base_model()).__name__ == "LlavaForConditionalGeneration"
    assert is_processor(processor)
