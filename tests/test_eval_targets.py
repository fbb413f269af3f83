"""Target tasks: answer extraction, JSONL targets, registration, NLL and batched generation."""

import json

import pytest
import torch

from forgetless.errors import ForgetlessError
from forgetless.eval import Target, TargetRow, extract_answer, get_target, register_target
from forgetless.eval.targets import answer_nll, generate_greedy, normalize_number, render_prompt
from test_eval_helpers import char_tokenizer
from tiny_models import tiny_model


@pytest.mark.parametrize(
    "text,answer",
    [
        ("Janet has 3 ducks.\n#### 1,234", "1234"),
        ("so 5 + 5 = 10\n#### 10.00", "10"),
        ("The answer is $5.", "5"),
        ("it costs 3.50 dollars", "3.5"),
        ("first 4 then -7", "-7"),
        ("There are 3 r's in strawberry, so 3", "3"),
        ("  Paris. ", "paris"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_normalize_number_rejects_words():
    assert normalize_number("seven") is None
    assert normalize_number("0.50") == "0.5"


def test_normalize_number_handles_runaway_digit_strings():
    # a degenerate generation can emit a 40-digit number; scoring must not crash on it
    digits = "1234567890" * 4
    assert normalize_number(digits) == digits
    assert normalize_number("1,000.00") == "1000"


def test_jsonl_target_prompt_response_and_messages(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [
        {"prompt": "2+2?", "response": "It is 4"},
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "3+3?"},
                      {"role": "assistant", "content": "6"}], "id": "six"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    loaded = get_target(str(path)).load()
    assert [r.answer for r in loaded] == ["4", "6"]
    assert loaded[1].id == "six" and len(loaded[1].messages) == 2


@pytest.mark.parametrize(
    "line,message",
    [("{not json", "bad.jsonl:1: invalid JSON"),
     ('{"prompt": "p"}', "bad.jsonl:1: missing or empty field 'response'"),
     ('{"messages": [{"role": "user", "content": "q"}]}', "must be the assistant's")],
)
def test_bad_jsonl_targets(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ForgetlessError, match=message):
        get_target(str(path)).load()


def test_unknown_target_lists_registered_ones():
    with pytest.raises(ForgetlessError, match="gsm8k"):
        get_target("no_such_target")


def test_register_target_is_a_few_lines():
    rows = [TargetRow("0", [{"role": "user", "content": "1+1?"}], "2", "2")]
    register_target(Target("tiny_sums", load=lambda: rows, max_new_tokens=4))
    assert get_target("tiny_sums").load() == rows


def test_answer_nll_equals_hand_computed_response_logprob():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    row = TargetRow("0", [{"role": "user", "content": "2+2?"}], "It is 4", "4")
    [(nll, count)] = answer_nll(model, tokenizer, [row])
    prompt = render_prompt(tokenizer, row.messages)
    ids = tokenizer.encode(prompt + row.response, add_special_tokens=False)
    n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    want = -sum(float(logp[i - 1, ids[i]]) for i in range(n_prompt, len(ids)))
    assert count == len("It is 4") and nll == pytest.approx(want, abs=1e-4)


def test_batched_greedy_generation_equals_one_by_one():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    rows = [TargetRow(str(i), [{"role": "user", "content": q}], "", "")
            for i, q in enumerate(["hi", "a longer question here?", "mid length q"])]
    batched = generate_greedy(model, tokenizer, rows, max_new_tokens=6, batch_size=3)
    single = [generate_greedy(model, tokenizer, [r], max_new_tokens=6)[0] for r in rows]
    assert batched == single
    assert all(len(text) > 0 for text in batched)


def test_largest_number_target_rows_are_unique_and_answered():
    from forgetless.eval import get_target

    rows = get_target("largest_number").load()
    assert len(rows) == len({row.messages[0]["content"] for row in rows}) >= 400
    for row in rows[:50]:
        numbers = row.messages[0]["content"].split("list ")[1].split("?")[0].split(", ")
        assert row.answer == row.response == str(max(map(int, numbers)))
