"""Task schema: built-in benchmark files, user YAML tasks, deterministic sampling, errors."""

import json

import pytest

from forgetless.errors import ForgetlessError
from forgetless.eval import builtin_tasks, load_spec, load_task
from forgetless.eval.tasks import TaskSpec, sample_indices
from forgetless.paths import shared_data_dir


def _has_shared_data() -> bool:
    try:
        return (shared_data_dir() / "arc").is_dir()
    except ForgetlessError:
        return False


needs_data = pytest.mark.skipif(not _has_shared_data(), reason="shared benchmark data absent")


def test_builtin_tasks_listed():
    assert {"arc_easy", "piqa", "mmlu", "winogrande"} <= set(builtin_tasks())


def test_sampling_is_deterministic_sorted_and_seed_dependent():
    a, b = sample_indices(1000, 50, seed=0), sample_indices(1000, 50, seed=0)
    assert a == b == sorted(a) and len(set(a)) == 50
    assert sample_indices(1000, 50, seed=1) != a
    assert sample_indices(10, None, 0) == list(range(10)) == sample_indices(10, 99, 0)


@needs_data
def test_arc_easy_prompt_matches_lm_eval_template_and_numeric_labels():
    task = load_task(load_spec("arc_easy"))
    assert task.total == 2376 and len(task.items) == 2376
    first = task.items[0]
    context, continuation = first.requests[0]
    assert context.startswith("Question: ") and context.endswith("\nAnswer:")
    assert continuation.startswith(" ")
    rows = [json.loads(line) for line in (shared_data_dir() / "arc/ARC-Easy-Test.jsonl").open()]
    numeric = next(i for i, r in enumerate(rows) if r["answerKey"].isdigit())
    labels = [c["label"] for c in rows[numeric]["question"]["choices"]]
    assert task.items[numeric].gold == labels.index(rows[numeric]["answerKey"])
    assert {len(i.requests) for i in task.items} == {3, 4, 5}


@needs_data
def test_piqa_labels_file_and_mmlu_fewshot_from_same_subject():
    piqa = load_task(load_spec("piqa"), limit=20, seed=3)
    assert len(piqa.items) == 20 and all(len(i.requests) == 2 for i in piqa.items)
    assert any(str(p).endswith("dev-labels.lst") for p in piqa.files)
    mmlu = load_task(load_spec("mmlu"), limit=3, seed=0, num_fewshot=2)
    context, continuation = mmlu.items[0].requests[0]
    subject = mmlu.items[0].id.split(":")[0].replace("_", " ")
    assert context.startswith(f"The following are multiple choice questions (with answers) "
                              f"about {subject}.\n\n")
    assert context.count("\nAnswer:") == 3  # two shots + the question
    assert [r[1] for r in mmlu.items[0].requests] == [" A", " B", " C", " D"]


@needs_data
def test_winogrande_partial_scoring_contexts():
    item = load_task(load_spec("winogrande"), limit=1, seed=0).items[0]
    (c1, x1), (c2, x2) = item.requests
    assert x1 == x2 and c1 != c2 and "_" not in c1 + c2


def _write_task(tmp_path, body: str, rows: list[dict]) -> str:
    (tmp_path / "quiz.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = tmp_path / "quiz.yaml"
    path.write_text(body)
    return str(path)


QUIZ = """
name: quiz
data_files: {test: quiz.jsonl, train: quiz.jsonl}
fewshot_split: train
text: "Q: {{q}}\\nA:"
choices: "options"
gold: "answer"
"""


def test_user_yaml_task_relative_paths_and_fewshot(tmp_path):
    rows = [{"q": f"q{i}", "options": ["x", "y", "z"], "answer": i % 3} for i in range(5)]
    task = load_task(load_spec(_write_task(tmp_path, QUIZ, rows)), limit=None, num_fewshot=1)
    assert len(task.items) == 5
    context, continuation = task.items[2].requests[1]
    assert context == "Q: q0\nA: x\n\nQ: q2\nA:" and continuation == " y"
    assert task.items[2].gold == 2 and task.items[2].norm_lengths == [1, 1, 1]
    assert task.items[0].id == "quiz:0"


def test_hub_dataset_spec_is_accepted_without_files():
    spec = TaskSpec(name="hub", dataset="allenai/ai2_arc", dataset_name="ARC-Easy",
                    text="{{question}}", choices="choices.text", gold="0")
    assert spec.dataset == "allenai/ai2_arc"


@pytest.mark.parametrize(
    "body,message",
    [
        ("name: [unclosed", "not valid YAML"),
        ("- just\n- a list", "mapping"),
        (QUIZ + "colour: blue\n", "unknown fields"),
        (QUIZ.replace("choices: \"options\"\n", ""), "either 'text' and 'choices'"),
        (QUIZ.replace('text: "Q: {{q}}\\nA:"', 'text: "{{q"'), "bad text"),
        (QUIZ.replace("quiz.jsonl, train", "nowhere.jsonl, train"), "data file not found"),
        (QUIZ.replace('gold: "answer"', 'gold: "answer + 7"'), "out of range"),
        (QUIZ.replace('gold: "answer"', 'gold: "missing_field"'), "cannot evaluate gold"),
    ],
)
def test_malformed_task_files_give_one_line_errors_naming_them(tmp_path, body, message):
    rows = [{"q": "q", "options": ["x", "y"], "answer": 1}]
    path = _write_task(tmp_path, body, rows)
    with pytest.raises(ForgetlessError, match=message) as err:
        load_task(load_spec(path))
    assert "\n" not in str(err.value)
    assert "quiz" in str(err.value)


def test_unknown_task_and_missing_task_file():
    with pytest.raises(ForgetlessError, match="unknown task 'no_such_task'"):
        load_spec("no_such_task")
    with pytest.raises(ForgetlessError, match="task file not found"):
        load_spec("/nowhere/task.yaml")


def test_missing_benchmark_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETLESS_DATA", str(tmp_path))
    with pytest.raises(ForgetlessError, match="arc_easy.*ARC-Easy-Test.jsonl"):
        load_spec("arc_easy")  # at once, before any job loads a model
