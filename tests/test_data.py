"""Training data: formats, loss masking, packing, and one-line errors naming file and line."""

import json

import pytest
from transformers import AutoTokenizer

from forgetless.data import (
    build_dataset,
    count_letters_rows,
    largest_number_rows,
    load_conversations,
    pack,
    tokenize_conversation,
)
from forgetless.errors import ForgetlessError
from forgetless.models import resolve_model
from forgetless.vlm.examples import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_loss_only_on_response_tokens(tokenizer):
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]
    example = tokenize_conversation(tokenizer, messages, 256)
    target = [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX]
    assert tokenizer.decode(target).startswith("hi there<|im_end|>")
    prompt = [t for t, lab in zip(example["input_ids"], example["labels"]) if lab == IGNORE_INDEX]
    assert "Say hi" in tokenizer.decode(prompt) and "hi there" not in tokenizer.decode(prompt)
    # the pieces tokenised separately reassemble the whole rendered conversation
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == full


def test_multi_turn_marks_every_assistant_turn(tokenizer):
    messages = [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"},
    ]
    example = tokenize_conversation(tokenizer, messages, 256)
    target = tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"])
                               if lab != IGNORE_INDEX])
    assert "first" in target and "second" in target and "b" not in target.replace("<|im_end|>", "")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_file_formats(tmp_path, suffix):
    rows = [{"prompt": "2+2?", "response": "4"}, {"prompt": "3+3?", "response": "6"}]
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        _write(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("prompt,response\n2+2?,4\n3+3?,6\n")
    conversations = load_conversations(str(path))
    assert [c[-1]["content"] for c in conversations] == ["4", "6"]


def test_chat_messages_rows(tmp_path):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert load_conversations(_write(tmp_path / "m.jsonl", [row]))[0][1]["content"] == "a"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "x", "response": "y"}\n{"prompt": "x"}\n', r"d\.jsonl:2: missing .*response"),
        ('{"prompt": "x", "response": "y"}\nnot json\n', r"d\.jsonl:2: invalid JSON"),
        ("", r"d\.jsonl: no rows"),
        ('{"messages": [{"role": "user", "content": "q"}]}\n', r"d\.jsonl:1: the last message"),
        ('{"messages": [{"role": "bot", "content": "q"}]}\n', r"d\.jsonl:1: message role"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, content, expected):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(ForgetlessError, match=expected):
        load_conversations(str(path))


def test_unknown_source_and_missing_file(tmp_path):
    with pytest.raises(ForgetlessError, match="unknown data 'nosuchtask'"):
        load_conversations("nosuchtask")
    with pytest.raises(ForgetlessError, match="data file not found"):
        load_conversations(str(tmp_path / "missing.jsonl"))


def test_gsm8k_builtin_reads_shared_data():
    conversations = load_conversations("gsm8k", "test")
    assert len(conversations) == 1319
    assert "####" in conversations[0][-1]["content"]


def test_count_letters_is_correct_and_splits_words():
    train, test = count_letters_rows("train", 500), count_letters_rows("test", 500)
    for row in train + test:
        word = row["prompt"].split("word '")[1].split("'")[0]
        letter = row["prompt"].split("letter '")[1][0]
        assert row["response"] == str(word.count(letter))
    words = {r["prompt"].split("word '")[1] for r in train}
    assert not words & {r["prompt"].split("word '")[1] for r in test}


def test_largest_number_is_correct_and_splits_lists():
    train, test = largest_number_rows("train", 500), largest_number_rows("test", 500)
    lists = {}
    for split, rows in (("train", train), ("test", test)):
        for row in rows:
            numbers = [int(x) for x in row["prompt"].split("list ")[1].split("?")[0].split(", ")]
            assert 3 <= len(numbers) <= 6 and row["response"] == str(max(numbers))
            lists.setdefault(split, set()).add(tuple(numbers))
    assert not lists["train"] & lists["test"]
    assert largest_number_rows("test", 5) == test[:5]  # deterministic


def test_build_dataset_limit_and_packing(tokenizer):
    plain = build_dataset(tokenizer, "count_letters", max_length=128, limit=10)
    assert len(plain) == 10
    packed = build_dataset(tokenizer, "count_letters", max_length=128, limit=10, packing=True)
    assert len(packed) < 10
    assert sum(len(x) for x in packed["input_ids"]) == sum(len(x) for x in plain["input_ids"])
    assert all(len(x) <= 128 for x in packed["input_ids"])


def test_pack_keeps_labels_aligned():
    examples = [{"input_ids": [1, 2], "labels": [-100, 2]}, {"input_ids": [3], "labels": [3]}]
    (block,) = pack(examples, 8)
    assert block["input_ids"] == [1, 2, 3] and block["labels"] == [-100, 2, 3]
