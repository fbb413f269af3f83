"""Training data: rows → chat messages → token ids with loss on response tokens only.

A data source is a built-in task name (``gsm8k``, ``count_letters``, ``largest_number``, or an
image task of ``forgetless.vlm.tasks`` such as ``count_shapes``), a local JSONL/JSON/CSV file
with ``prompt``/``response`` columns or chat ``messages``, or a Hub dataset id. Every malformed
row is a one-line error naming file and line, since a silently skipped row skews a comparison.

Image rows (for vision-language models) follow TRL's convention, ``images: [path, ...]`` with
``{"type": "image"}`` parts in the user content, or the short form ``{image, prompt,
response}``; paths are relative to the data file. A missing or unreadable image is an error
when the data is read, before any model loads. Their batches are built by the model's
processor (``ImageTextCollator``), which expands each image into its image tokens.
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
from forgetless.vlm.collator import ImageTextCollator
from forgetless.vlm.examples import IGNORE_INDEX, Example, Messages, image_messages
from forgetless.vlm.images import check_image
from forgetless.vlm.processors import is_processor
from forgetless.vlm.tasks import IMAGE_TASKS, image_task_rows

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
    for key in ("prompt", "response"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ForgetlessError(f"{where}: missing or empty field '{key}' (or give 'messages')")
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
IMAGE_TRAIN_ROWS = 2000  # examples of a built-in image task used as training data


def _image_task_examples(name: str, split: str) -> list[Example]:
    return [Example(image_messages(row.prompt, row.response), [row.image])
            for row in image_task_rows(name, split, n=IMAGE_TRAIN_ROWS)]


def _image_paths(value: Any, where: str, base_dir: Path | None) -> list[Path]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip()
                                                           for v in value):
        raise ForgetlessError(f"{where}: 'images' must be a non-empty list of file paths")
    paths = []
    for text in value:
        try:
            path = Path(text).expanduser()
        except RuntimeError as err:  # "~user/..." for an unknown user
            raise ForgetlessError(f"{where}: bad image path {text[:120]!r} ({err})") from None
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        paths.append(check_image(path, where))
    return paths


def _content_parts(content: Any, where: str) -> list[dict[str, str]]:
    """A message's content as TRL parts: a string becomes one text part."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise ForgetlessError(f"{where}: message content must be a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise ForgetlessError(f"{where}: a content part must be {{\"type\": \"image\"}} "
                                  "or {\"type\": \"text\", \"text\": ...}")
    return parts


def row_to_example(row: dict[str, Any], where: str, base_dir: Path | None = None) -> Example:
    """A row as an ``Example``: a text row as ``row_to_messages`` reads it, an image row
    (``images`` + ``messages`` with image parts, or ``image`` + ``prompt`` + ``response``)
    with its image paths resolved against ``base_dir`` and checked readable."""
    if "images" not in row and "image" not in row:
        return Example(row_to_messages(row, where))
    if "images" in row and "image" in row:
        raise ForgetlessError(f"{where}: give 'images' (a list) or 'image', not both")
    images = _image_paths(row.get("images", row.get("image")), where, base_dir)
    if "messages" not in row:
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ForgetlessError(f"{where}: missing or empty field '{key}' (or give "
                                      "'messages')")
        return Example(image_messages(row["prompt"], row["response"], len(images)), images)
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ForgetlessError(f"{where}: 'messages' must be a non-empty list")
    out: Messages = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in (
                "system", "user", "assistant"):
            raise ForgetlessError(f"{where}: each message needs a role of system, user or "
                                  "assistant")
        out.append({"role": message["role"],
                    "content": _content_parts(message.get("content"), where)})
    if out[-1]["role"] != "assistant":
        raise ForgetlessError(f"{where}: the last message must be the assistant's")
    slots = sum(part["type"] == "image" for m in out for part in m["content"])
    if slots != len(images):
        raise ForgetlessError(f"{where}: {len(images)} image(s) but {slots} "
                              "{\"type\": \"image\"} part(s) in the messages")
    return Example(out, images)


def load_examples(source: str, split: str = "train") -> list[Example]:
    """Examples (conversations + images) from a built-in task, a local file, or a Hub id."""

    if source in BUILTIN_TASKS:
        return [Example(messages) for messages in BUILTIN_TASKS[source](split)]
    if source in IMAGE_TASKS:
        return _image_task_examples(source, split)
    try:
        path = Path(source).expanduser()
        exists = path.exists()
    except (OSError, RuntimeError, ValueError) as err:  # too long a name, "~nobody/x"
        raise ForgetlessError(f"bad data path {source[:120]!r} ({err})") from None
    if path.suffix.lower() in {".jsonl", ".json", ".csv"} or exists:
        return [row_to_example(row, f"{path}:{number}", path.parent)
                for number, row in read_rows(path)]
    if "/" not in source:
        raise ForgetlessError(
            f"unknown data '{source}': not a file, not a built-in task "
            f"({', '.join([*BUILTIN_TASKS, *IMAGE_TASKS])}), not a Hub id (owner/name)"
        )
    try:
        import datasets

        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # noqa: BLE001 - the Hub raises many types; one line is the contract
        raise ForgetlessError(f"cannot load Hub dataset '{source}': {err}") from err
    return [Example(row_to_messages(dict(row), f"{source}[{i}]"))
            for i, row in enumerate(dataset)]


def load_conversations(source: str, split: str = "train") -> list[Messages]:
    """Conversations from a built-in task, a local file, or a Hub dataset id (images are
    checked, and dropped: ``load_examples`` keeps them)."""
    return [example.messages for example in load_examples(source, split)]


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
    """A training dataset shuffled with ``seed``: for a tokenizer, a tokenised
    ``datasets.Dataset``; for a VLM's processor, the list of ``Example`` that
    ``ImageTextCollator`` turns into batches (text rows too, through the processor's template)."""
    import datasets

    examples = load_examples(source, split)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    chosen = [examples[i] for i in order]
    if is_processor(tokenizer):
        if packing:
            raise ForgetlessError("packing: not supported for a vision-language model "
                                  "(its processor builds each example's image tokens)")
        return chosen
    if any(example.images for example in chosen):
        raise ForgetlessError(f"{source}: rows with images need a vision-language model (one "
                              "whose config has a vision_config); this model has a tokenizer only")
    tokenized = [tokenize_conversation(tokenizer, e.messages, max_length) for e in chosen]
    tokenized = [e for e in tokenized if any(label != IGNORE_INDEX for label in e["labels"])]
    if not tokenized:
        raise ForgetlessError(f"{source}: no example keeps a response token within {max_length}")
    if packing:
        tokenized = pack(tokenized, max_length)
    return datasets.Dataset.from_list(tokenized)


def data_collator(tokenizer: Any, max_length: int = 512) -> Any:
    """The collator for ``build_dataset``'s output: padding for tokenised text, the processor
    for a VLM."""
    from transformers import DataCollatorForSeq2Seq

    if is_processor(tokenizer):
        return ImageTextCollator(tokenizer, max_length)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


