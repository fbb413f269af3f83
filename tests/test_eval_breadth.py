"""Held-out breadth: xcopa (11 languages, lm-eval connectors), per language and pooled."""

import pytest

from forgetless.errors import ForgetlessError
from forgetless.eval import builtin_tasks, evaluate, load_spec, load_task
from forgetless.paths import shared_data_dir
from test_eval_helpers import char_tokenizer
from tiny_models import tiny_model

XCOPA_LANGS = ["et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh"]


def _has(folder: str) -> bool:
    try:
        return (shared_data_dir() / folder).is_dir()
    except ForgetlessError:
        return False


needs_xcopa = pytest.mark.skipif(not _has("xcopa"), reason="shared xcopa data absent")


def test_xcopa_tasks_listed_one_per_language_and_pooled():
    names = set(builtin_tasks())
    assert {"xcopa", *(f"xcopa_{lang}" for lang in XCOPA_LANGS)} <= names


@needs_xcopa
def test_xcopa_prompts_follow_lm_eval_connectors():
    # lm-eval: premise without its last character + " " + connector; choices lower-cased first.
    et = load_task(load_spec("xcopa_et"), limit=None).items
    assert et[0].requests == [("Ese oli mullikilesse mässitud sest", " see oli õrn."),
                              ("Ese oli mullikilesse mässitud sest", " see oli väike.")]
    assert et[0].gold == 0 and et[0].id == "et:0"
    assert et[1].requests[0][0] == "Ma tühjendasin oma taskud seetõttu"
    zh = load_task(load_spec("xcopa_zh"), limit=None).items
    assert zh[0].requests[0] == ("该物品用气泡包装纸包着 因为", " 它很易碎。")
    assert zh[1].requests[0][0].endswith(" 所以")
    assert len(et) == len(zh) == 500


@needs_xcopa
def test_xcopa_pooled_renders_each_item_as_its_language_task():
    pooled = load_task(load_spec("xcopa"), limit=None)
    assert len(pooled.items) == 11 * 500
    by_id = {item.id: item for item in pooled.items}
    for lang in XCOPA_LANGS:
        for item in load_task(load_spec(f"xcopa_{lang}"), limit=5, seed=1).items:
            assert by_id[item.id].requests == item.requests
            assert by_id[item.id].gold == item.gold
    # few-shot examples come from the item's own language
    shot = load_task(load_spec("xcopa"), limit=3, seed=0, num_fewshot=1)
    for item in shot.items:
        lang = item.id.split(":")[0]
        plain = by_id[item.id].requests[0][0]
        assert item.requests[0][0].endswith(plain) and item.requests[0][0] != plain
        assert lang in XCOPA_LANGS


@needs_xcopa
def test_xcopa_scored_with_acc_and_continuous_measures():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    result = evaluate(model, tokenizer, suite=["xcopa_it", "xcopa"], limit=2, batch_size=4)
    for task in ("xcopa_it", "xcopa"):
        assert {f"{task}/{m}" for m in ("acc", "gold_logprob", "margin")} <= set(result.metrics)
        assert f"{task}/acc_norm" not in result.metrics
        assert len(result.per_item[task]) == 2
    assert "heldout/gold_logprob" in result.metrics


needs_humaneval = pytest.mark.skipif(not _has("humaneval"), reason="shared humaneval data absent")

CODE_TASK = """
name: tiny_code
output_type: generate_until
data_files: {test: code.jsonl}
id: "key"
text: "{{ prompt }}"
target: "{{ solution }}"
check: "\\n{{ test }}\\n"
until: ["\\ndef"]
max_new_tokens: "6"
metrics: [acc]
"""


@needs_humaneval
def test_humaneval_items_and_canonical_solutions_pass_in_the_sandbox():
    from forgetless.eval.sandbox import run_python

    loaded = load_task(load_spec("humaneval"), limit=None)
    assert len(loaded.items) == 164 and loaded.items[0].id == "HumanEval/0"
    first = loaded.items[0]
    assert first.requests[0][0].startswith("from typing import List")
    assert first.check.rstrip().endswith("check(has_close_elements)")
    for item in loaded.items[:3]:  # prompt + reference + tests pass: the program is assembled right
        prompt, solution = item.requests[0]
        assert run_python(prompt + solution + item.check).passed, item.id
    broken = loaded.items[0]
    assert not run_python(broken.requests[0][0] + "    return None\n" + broken.check).passed


@needs_xcopa
def test_code_task_pass_at_1_and_solution_logprob(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "")  # the opt-in sets it: undone after the test

    import forgetless.eval.evaluator as evaluator

    rows = [{"key": "a", "prompt": "def f():\n", "solution": "    return 1\n",
             "test": "assert f() == 1"},
            {"key": "b", "prompt": "def g():\n", "solution": "    return 2\n",
             "test": "assert g() == 2"}]
    (tmp_path / "code.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "code.yaml").write_text(CODE_TASK)
    completions = ["    return 1\ndef junk(): pass", "    while True: pass\n"]
    monkeypatch.setattr(evaluator, "generate_greedy",
                        lambda *a, prompts, **k: completions[: len(prompts)])
    monkeypatch.setattr("forgetless.eval.sandbox.Limits.__init__.__defaults__",
                        (1.0, 1, 1 << 30, 1 << 20, 16, 64, 65536))
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    result = evaluate(model, tokenizer, suite=[str(tmp_path / "code.yaml"), "xcopa_it"],
                      limit=2, confirm_run_unsafe_code=True)  # the opt-in lm-eval asks for
    records = result.per_item["tiny_code"]
    assert [r["correct"] for r in records] == [1, 0]  # cut at "\ndef"; the loop is killed
    assert records[0]["output"] == "    return 1" and records[1]["timed_out"]
    assert result.metrics["tiny_code/pass@1"].value == 0.5  # lm-eval's name for it
    assert "tiny_code/acc" not in result.metrics
    assert all(r["gold_logprob"] < 0 for r in records)
    # per reference token, so pooled with the MC tasks it is not a sum of tens of nats
    for r in records:
        assert r["tokens"] == len("\n    return 1\n")  # per character; the prompt's "\n" moves over
        assert abs(r["gold_logprob"] * r["tokens"] - r["gold_logprob_sum"]) < 1e-4
    assert "tiny_code/margin" not in result.metrics and "heldout/acc" in result.metrics
