"""Data mixing: the stream's composition, determinism, token budget; bad mix input is one line
before any model loads; continual replay (reservoir) feeds later stages."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from forgetless.config import TrainConfig, validate
from forgetless.errors import ForgetlessError
from forgetless.mixing import build_mixed, interleave
from forgetless.models import resolve_model
from forgetless.replay import ReplayBuffer, ReplaySettings, replay_files


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


def _config(**keys) -> TrainConfig:
    settings = dict(data="count_letters", limit=40, batch_size=4, max_steps=25, max_length=64,
                    mix=[{"source": "largest_number", "ratio": 0.3, "exclude": []}],
                    report_to=[])
    return validate(TrainConfig, {**settings, **keys})


def _sources(mixed) -> list[int]:
    return [part[0][0] for part in mixed.parts]


def test_interleave_holds_every_prefix_within_one_example():
    shares = [0.5, 0.3, 0.2]
    stream = interleave(shares)
    counts = [0, 0, 0]
    for length in range(1, 1001):
        counts[next(stream)] += 1
        assert all(abs(c - s * length) <= 1 for c, s in zip(counts, shares, strict=True))


def test_stream_ratio_deterministic_same_for_methods_other_for_seeds(tokenizer):
    mixed = build_mixed(_config(method="full"), tokenizer)
    sources = _sources(mixed)
    assert len(mixed.dataset) == 25 * 4  # exactly what max_steps x batch reads
    assert abs(sources.count(1) - 30) <= 1  # 30 % of 100 examples
    for end in range(4, 101, 4):  # every batch boundary holds the share too
        assert abs(sources[:end].count(1) - 0.3 * end) <= 1
    first = build_mixed(_config(method="full"), tokenizer).dataset["input_ids"]
    assert mixed.dataset["input_ids"] == first  # deterministic
    other_method = build_mixed(_config(method="attn+mofo"), tokenizer).dataset["input_ids"]
    assert other_method == first  # two methods, one stream
    other_seed = build_mixed(_config(method="full", seed=1), tokenizer)
    assert other_seed.dataset["input_ids"] != first
    assert abs(_sources(other_seed).count(1) - 30) <= 1
    # the general rows are real rows of the source, several distinct ones
    general = {tuple(ids) for ids, s in zip(first, sources, strict=True) if s == 1}
    assert len(general) > 20


def test_packing_and_token_counts(tokenizer):
    mixed = build_mixed(_config(packing=True, max_length=128), tokenizer)
    assert len(mixed.dataset) == 100  # blocks, as many as the steps read
    lengths = [len(ids) for ids in mixed.dataset["input_ids"]]
    assert all(n <= 128 for n in lengths)
    summary = mixed.summary(25)
    assert summary["tokens_seen"] == sum(lengths)  # every token of every block counted
    examples = summary["sources"][1]["examples"] + summary["sources"][0]["examples"]
    assert abs(summary["sources"][1]["examples"] - 0.3 * examples) <= 1
    assert summary["sources"][0]["target_tokens"] > 0


def test_summary_counts_only_the_steps_run(tokenizer):
    mixed = build_mixed(_config(), tokenizer)
    full, half = mixed.summary(25), mixed.summary(10)
    assert sum(s["examples"] for s in half["sources"]) == 40
    assert half["tokens_seen"] < full["tokens_seen"]
    assert full["tokens_seen"] == sum(len(ids) for ids in mixed.dataset["input_ids"])


def test_budget_task_scales_steps(tokenizer):
    mixed = build_mixed(_config(mix_budget="task", max_steps=14), tokenizer)
    assert mixed.max_steps == math.ceil(14 / 0.7) == 20
    assert _sources(mixed).count(0) >= 14 * 4  # the task examples of an unmixed run


def test_overlapping_general_rows_are_dropped(tokenizer, tmp_path):
    from forgetless.mixing import heldout_texts

    item = heldout_texts(["piqa"])[0]  # a held-out question with its gold answer
    rows = [{"prompt": f"Tell me about topic number {i} please.", "response": f"Topic {i}."}
            for i in range(9)]
    rows.append({"prompt": item.split("\n")[0], "response": "copied"})
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(mix=[{"source": str(path), "ratio": 0.5, "exclude": ["piqa"]}])
    summary = build_mixed(config, tokenizer).summary(25)
    general = summary["sources"][1]
    assert general["rows_read"] == 10 and general["dropped_overlap_heldout"] == 1
    assert general["rows"] == 9


def test_train_reports_token_budget(tokenizer, tmp_path, capfd):
    from forgetless.train import train

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        pad_token_id=2, eos_token_id=2))
    result = train(model=model, tokenizer=tokenizer, method="full", data="count_letters",
                   limit=8, batch_size=2, max_steps=4, max_length=64, learning_rate=1e-3,
                   report_to=[], output_dir=str(tmp_path / "run"), save_model=False,
                   mix=[{"source": "largest_number", "ratio": 0.5, "exclude": []}],
                   mix_budget="task")
    mix = json.loads((tmp_path / "run" / "metrics.json").read_text())["mix"]
    assert result.metrics["steps"] == 8  # 4 / (1 - 0.5): the task examples of 4 steps
    assert [s["examples"] for s in mix["sources"]] == [8, 8]
    assert mix["token_multiplier"] == pytest.approx(mix["tokens_seen"] / mix["task_tokens_seen"])
    assert mix["token_multiplier"] > 1.5  # the mix doubled the examples: it says what it cost
    assert "tokens seen" in capfd.readouterr().out


# --- bad input: one line, before any model loads ---------------------------------------------


BAD_MIXES = [
    ("[{source: no_such_data, ratio: 0.2}]", "mix source 'no_such_data': unknown data"),
    ("[{source: gsm8k, ratio: 1.5}]", "strictly between 0 and 1"),
    ("[{source: gsm8k, ratio: 0}]", "strictly between 0 and 1"),
    ("[{source: gsm8k, ratio: 0.6}, {source: count_letters, ratio: 0.5}]", "add up to 1.1"),
    ("[{source: self, ratio: 0.2, prompts: /nonexistent/pool.txt}]", "prompt pool not found"),
]


@pytest.mark.parametrize(("mix", "message"), BAD_MIXES)
def test_bad_mix_is_one_line_before_a_model_loads(no_model, cli, tmp_path, mix, message):
    code, _, err = cli("train", f"mix={mix}", "report_to=[]",
                       f"output_dir={tmp_path / 'run'}")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("forgetless: error: ")
    assert message in lines[0], err


def test_unreadable_mix_file_is_one_line(no_model, cli, tmp_path):
    bad = tmp_path / "general.jsonl"
    bad.write_text('{"prompt": "hi", "response": "there"}\n{not json\n')
    code, _, err = cli("train", f"mix=[{{source: {bad}, ratio: 0.2}}]")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"{bad}:2: invalid JSON" in lines[0], err


@pytest.mark.parametrize("command", ["compare", "continual"])
def test_bad_mix_in_sectioned_configs(no_model, cli, tmp_path, command):
    config = tmp_path / f"{command}.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nmethods: [full]\n"
                      "train: {mix: [{source: nowhere_data, ratio: 0.3}]}\n")
    code, _, err = cli(command, str(config))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "mix source 'nowhere_data'" in lines[0], err


# --- replay -----------------------------------------------------------------------------------


def test_reservoir_is_bounded_and_uniform():
    inclusion = Counter()
    trials = 300
    for seed in range(trials):
        buffer = ReplayBuffer(size=50, seed=seed)
        buffer.add(list(range(200)))
        buffer.add(list(range(200, 500)))
        assert len(buffer.rows) == 50 and len(set(buffer.rows)) == 50 and buffer.seen == 500
        inclusion.update(buffer.rows)
    # each row is kept with probability 50/500 = 0.1, early or late: compare the two halves
    early = sum(inclusion[i] for i in range(250)) / (250 * trials)
    late = sum(inclusion[i] for i in range(250, 500)) / (250 * trials)
    assert early == pytest.approx(0.1, abs=0.01) and late == pytest.approx(0.1, abs=0.01)
    again = ReplayBuffer(size=50, seed=7)
    again.add(list(range(500)))
    other = ReplayBuffer(size=50, seed=7)
    other.add(list(range(500)))
    assert again.rows == other.rows  # seeded: every method replays the same rows


def test_replay_feeds_later_stages_at_its_share(tokenizer, tmp_path):
    settings = ReplaySettings(size=30, share=0.25, seed=0)
    stages = [("count_letters", {"limit": 20}), ("largest_number", {"limit": 20}),
              ("count_letters", {"limit": 20, "seed": 3})]
    mixes = replay_files(settings, stages, tmp_path / "replay")
    assert mixes[0] is None
    stage2 = [json.loads(line) for line in (tmp_path / "replay" / "stage2.jsonl").open()]
    stage3 = [json.loads(line) for line in (tmp_path / "replay" / "stage3.jsonl").open()]
    assert len(stage2) == 20 and len(stage3) == 30  # bounded by size
    letters = sum("letter" in row["messages"][0]["content"] for row in stage3)
    assert 0 < letters < 30  # stage 3 replays stages 1 and 2
    config = _config(data="largest_number", mix=[mixes[1]])
    sources = _sources(build_mixed(config, tokenizer))
    assert abs(sources.count(1) - 25) <= 1  # 25 % of 100 examples from the buffer


def test_continual_stage_keys_add_replay():
    from forgetless.continual import Stage, _stage_keys

    stage = Stage("b", "largest_number", "largest_number", {},
                  replay={"source": "r.jsonl", "ratio": 0.2, "exclude": []})
    keys = _stage_keys({"mix": {"source": "gsm8k", "ratio": 0.1}}, stage)
    assert [m["source"] for m in keys["mix"]] == ["gsm8k", "r.jsonl"]


def test_bad_replay_share_is_one_line():
    from forgetless.continual import load_continual_config

    with pytest.raises(ForgetlessError, match="replay.share"):
        load_continual_config({"replay": {"share": 1.0}})


def test_vlm_rows_mix_with_text_rows(tmp_path):
    from PIL import Image

    from forgetless.train import train
    from tiny_models import tiny_model
    from tiny_vlm import tiny_processor

    Image.new("RGB", (20, 20), "red").save(tmp_path / "red.png")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"image": "red.png", "prompt": f"Color {i}?",
                                        "response": "red"}) + "\n" for i in range(3)))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"prompt": f"Say {i}", "response": f"{i}"}) + "\n"
                               for i in range(5)))
    result = train(model=tiny_model("llava").train(), tokenizer=tiny_processor("llava"),
                   data=str(task), method="full", max_steps=2, batch_size=2,
                   learning_rate=1e-2, output_dir=str(tmp_path / "run"), report_to=[],
                   device="cpu", dtype="float32", save_model=False,
                   mix=[{"source": str(general), "ratio": 0.5, "exclude": []}])
    task_part, text_part = result.metrics["mix"]["sources"]
    assert task_part["examples"] == text_part["examples"] == 2
    # an image row counts its image tokens (the processor expands each image's placeholder)
    from forgetless.data import image_messages
    from forgetless.vlm.processors import process, render_multimodal

    processor = tiny_processor("llava")
    text = render_multimodal(processor, image_messages("Color 0?", "red"))
    placeholder_once = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    expanded = process(processor, [text], [[Image.open(tmp_path / "red.png")]])
    assert expanded["input_ids"].shape[1] > placeholder_once
    assert task_part["tokens"] == 2 * expanded["input_ids"].shape[1]


def test_mix_changes_the_compare_hash_only_when_set():
    from forgetless.compare import PlannedMethod, train_hash

    plain = validate(TrainConfig, {"data": "count_letters"})
    mixed = validate(TrainConfig, {"data": "count_letters",
                                   "mix": [{"source": "largest_number", "ratio": 0.2,
                                            "exclude": []}]})
    assert "mix" not in str(plain.model_dump(exclude={"mix", "mix_budget"}))
    assert train_hash(PlannedMethod("full", plain)) != train_hash(PlannedMethod("full", mixed))


def test_training_set_check_covers_mix_sources(tokenizer, tmp_path):
    from forgetless.train import check_training_sets

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 200, "response": "ok"}) + "\n")
    config = _config(mix=[{"source": str(long), "ratio": 0.2, "exclude": []}])
    with pytest.raises(ForgetlessError, match="keeps a response token within max_length"):
        check_training_sets(tokenizer, [config])  # a compare fails here, before its base eval


def test_report_states_the_token_budget_of_mixed_runs():
    from forgetless.report import token_budget_lines

    mixed = {"sources": [("largest_number", 0.7), ("gsm8k", 0.3)], "tokens_seen": 2000,
             "task_tokens_seen": 900, "token_multiplier": 2000 / 900}
    lines = token_budget_lines({"methods": [
        {"name": "full", "train": {"tokens": None}},
        {"name": "full+mix", "train": {"tokens": mixed}}]})
    assert lines[0] == ("`full+mix`: examples largest_number 70%, gsm8k 30%; 2,000 tokens seen, "
                        "2.22x the 900 task tokens (the mix at least doubles the token budget)")
    assert len(lines) == 2 and not token_budget_lines({"methods": [
        {"name": "full", "train": {"tokens": None}}]})
