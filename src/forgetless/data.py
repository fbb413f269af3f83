"""Training data: rows → chat messages → token ids with loss on response tokens only.

A data source is a built-in task name (``gsm8k``, ``count_letters``, ``largest_number``), a
local JSONL/JSON/CSV file with ``prompt``/``response`` columns or chat ``messages``, or a Hub
dataset id. Every malformed row is a one-line error naming file and line, since a silently
skipped row skews a comparison.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgetless.errors import ForgetlessError
from forgetless.paths import shared_data_dir

Messages = list[dict[str, str]]
IGNORE_INDEX = -100


# --- reading rows -------------------------------------------------------------------------


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a JSONL, JSON (list of objects) or CSV file, each with its 1-based line number."""
    if not path.is_file():
        raise ForgetlessError(f"data file not found: {path}")
    try:
        rows = _read_rows(path)
    except UnicodeDecodeError as err:
        raise ForgetlessError(f"{path}: not UTF-8 text (bad byte at offset {err.start}); "
                              "save the file as UTF-8") from None
    except csv.Error as err:
        raise ForgetlessError(f"{path}: invalid CSV ({err})") from None
    except RecursionError:
        raise ForgetlessError(f"{path}: JSON nested too deeply") from None
    except OSError as err:
        raise ForgetlessError(f"{path}: cannot read ({err.strerror})") from None
    if not rows:
        raise ForgetlessError(f"{path}: no rows")
    for number, row in rows:
        if not isinstance(row, dict):
            raise ForgetlessError(f"{path}:{number}: a row must be an object")
    return rows


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    suffix = path.suffix.lower()
    rows: list[tuple[int, Any]] = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if suffix == ".jsonl":
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ForgetlessError(f"{path}:{number}: invalid JSON ({err.msg})") from err
                except ValueError as err:  # e.g. an integer beyond Python's digit limit
                    raise ForgetlessError(f"{path}:{number}: invalid JSON ({err})") from None
                rows.append((number, row))
        elif suffix == ".json":
            try:
                data = json.load(handle)
            except json.JSONDecodeError as err:
                raise ForgetlessError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
            except ValueError as err:
                raise ForgetlessError(f"{path}: invalid JSON ({err})") from None
            if not isinstance(data, list):
                raise ForgetlessError(f"{path}: expected a JSON list of rows")
            rows = [(index + 1, row) for index, row in enumerate(data)]
        elif suffix == ".csv":
            reader = csv.DictReader(handle)
            rows = [(reader.line_num, dict(row)) for row in reader]
        else:
            raise ForgetlessError(f"{path}: unsupported data format '{suffix}' (jsonl, json, csv)")
    return rows


def row_to_messages(row: dict[str, Any], where: str) -> Messages:
    """A row as chat messages; ``where`` ("file:line") names the row in errors."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ForgetlessError(f"{where}: 'messages' must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise ForgetlessError(f"{where}: each message needs a string 'content'")
            if message.get("role") not in ("system", "user", "assistant"):
                raise ForgetlessError(f"{where}: message role must be system, user or assistant")
        if messages[-1]["role"] != "assistant":
            raise ForgetlessError(f"{where}: the last message must be the assistant's")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    for field in ("prompt", "response"):
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ForgetlessError(f"{where}: missing or empty field '{field}' (or give 'messages')")
    return [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["response"]},
    ]


# --- built-in tasks -----------------------------------------------------------------------


def _gsm8k(split: str) -> list[Messages]:
    """GSM8K from the shared data: the question as prompt, the full worked answer as response."""
    path = shared_data_dir() / "gsm8k" / f"{split}.jsonl"
    out = []
    for number, row in read_rows(path):
        if "question" not in row or "answer" not in row:
            raise ForgetlessError(f"{path}:{number}: GSM8K rows need 'question' and 'answer'")
        out.append(row_to_messages({"prompt": row["question"], "response": row["answer"]}, ""))
    return out


def _words() -> list[str]:
    text = (Path(__file__).parent / "data_files" / "words.txt").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return sorted({word for line in lines for word in line.split()})


def _pick_letter(word: str, rng: random.Random) -> str:
    """A letter for ``word``: absent 15% of the time, repeated where possible, else any."""
    absent = sorted(set("abcdefghijklmnopqrstuvwxyz") - set(word))
    repeated = sorted({c for c in word if word.count(c) > 1})
    roll = rng.random()
    if roll < 0.15:
        return rng.choice(absent)
    if repeated and roll < 0.6:
        return rng.choice(repeated)
    return rng.choice(word)


def count_letters_rows(split: str, n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """Synthetic letter counting with a numeric answer.

    A small instruct model cannot count letters, and the answer is a bare number, so tuning on it
    provokes the number-token drift that arXiv 2510.08564 describes. Train and test use disjoint
    words (every 4th word is test), so the test measures the skill, not memorised words.
    """
    words = _words()
    pool = [w for i, w in enumerate(words) if (i % 4 == 3) == (split == "test")]
    rng = random.Random(f"count_letters:{split}:{seed}")
    rows = []
    for _ in range(n):
        word = rng.choice(pool)
        letter = _pick_letter(word, rng)
        prompt = (f"How many times does the letter '{letter}' appear in the word '{word}'? "
                  "Answer with a number only.")
        rows.append({"prompt": prompt, "response": str(word.count(letter))})
    return rows


def _count_letters(split: str) -> list[Messages]:
    return [row_to_messages(row, "count_letters") for row in count_letters_rows(split)]


def largest_number_rows(split: str, n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """Synthetic "largest of 3-6 two-digit numbers", answered with the number alone.

    SmolLM2-135M-Instruct answers about a quarter of these right (it picks a wrong number, or
    chats), yet learns them within tens of steps: a numeric skill that is clearly absent before
    and present after, at CPU budgets. Train and test lists are disjoint (a list is a test list
    when the sum of its numbers is a multiple of 4), so the test measures the skill.
    """
    rng = random.Random(f"largest_number:{split}:{seed}")
    rows = []
    while len(rows) < n:
        numbers = rng.sample(range(10, 100), rng.randint(3, 6))
        if (sum(numbers) % 4 == 0) != (split == "test"):
            continue
        prompt = (f"What is the largest number in the list {', '.join(map(str, numbers))}? "
                  "Answer with the number only.")
        rows.append({"prompt": prompt, "response": str(max(numbers))})
    return rows


def _largest_number(split: str) -> list[Messages]:
    return [row_to_messages(row, "largest_number") for row in largest_number_rows(split)]


BUILTIN_TASKS: dict[str, Callable[[str], list[Messages]]] = {
    "gsm8k": _gsm8k,
    "count_letters": _count_letters,
    "largest_number": _largest_number,
}


def load_conversations(source: str, split: str = "train") -> list[Messages]:
    """Conversations from a built-in task, a local file, or a Hub dataset id."""
    if source in BUILTIN_TASKS:
        return BUILTIN_TASKS[source](split)
    path = Path(source).expanduser()
    if path.suffix.lower() in {".jsonl", ".json", ".csv"} or path.exists():
        return [row_to_messages(row, f"{path}:{number}") for number, row in read_rows(path)]
    if "/" not in source:
        raise ForgetlessError(
            f"unknown data '{source}': not a file, not a built-in task "
            f"({', '.join(BUILTIN_TASKS)}), not a Hub id (owner/name)"
        )
    try:
        import datasets

        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # noqa: BLE001 - the Hub raises many types; one line is the contract
        raise ForgetlessError(f"cannot load Hub dataset '{source}': {err}") from err
    return [row_to_messages(dict(row), f"{source}[{i}]") for i, row in enumerate(dataset)]


# --- tokenising ---------------------------------------------------------------------------


def render(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> str:
    """Chat-template text; tokenizers without a template get a plain ``prompt\\n\\nresponse``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    text = "\n\n".join(m["content"] for m in messages)
    if messages[-1]["role"] != "assistant" or add_generation_prompt:
        return text + "\n\n"
    return text + (tokenizer.eos_token or "")


def tokenize_conversation(tokenizer: Any, messages: Messages, max_length: int) -> dict:
    """Token ids and labels; labels are ``-100`` everywhere except the assistant turns.

    The rendered text is split at each assistant turn's boundaries, so only the model's own words
    (and its end-of-turn token) carry loss.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:index], add_generation_prompt=True) if index else ""
        upto = render(tokenizer, messages[: index + 1])
        for text, is_target in ((prefix[len(done):], False), (upto[len(prefix):], True)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            input_ids += ids
            labels += ids if is_target else [IGNORE_INDEX] * len(ids)
        done = upto
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples into blocks of ``max_length`` tokens (fewer pad tokens, faster)."""
    blocks: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        if ids and len(ids) + len(example["input_ids"]) > max_length:
            blocks.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
            ids, labels = [], []
        ids, labels = ids + example["input_ids"], labels + example["labels"]
    if ids:
        blocks.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return blocks


def build_dataset(
    tokenizer: Any,
    source: str,
    max_length: int = 512,
    limit: int | None = None,
    seed: int = 0,
    packing: bool = False,
    split: str = "train",
):
    """A tokenised ``datasets.Dataset`` ready for the Trainer, shuffled with ``seed``."""
    import datasets

    conversations = load_conversations(source, split)
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    examples = [tokenize_conversation(tokenizer, conversations[i], max_length) for i in order]
    examples = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
    if not examples:
        raise ForgetlessError(f"{source}: no example keeps a response token within {max_length}")
    if packing:
        examples = pack(examples, max_length)
    return datasets.Dataset.from_list(examples)
