"""Target tasks (what a fine-tune should learn): greedy exact match and answer NLL.

A target is data: a name, a loader of ``TargetRow`` (chat prompt, reference response, final
answer) and an answer extractor. Registering one takes a few lines::

    from forgetless.eval import Target, TargetRow, register_target

    def _rows():
        return [TargetRow(id="0", messages=[{"role": "user", "content": "2+2?"}],
                          response="4", answer="4")]

    register_target(Target("sums", load=_rows, max_new_tokens=8))

A path to a ``.jsonl`` file also works as a target: rows with ``prompt``/``response`` or chat
``messages`` (the last assistant message is the response). Prompts go through the tokenizer's
chat template, matching how the training data module formats GSM8K (user = question,
assistant = the full ``answer`` text). A row may carry images (``TargetRow.images``; image rows
of a ``.jsonl`` as training data writes them; the built-in image tasks ``count_shapes``,
``read_clock``, ``name_color``, ``name_shape``): a VLM's processor then builds its prompts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch

from forgetless.data import count_letters_rows, largest_number_rows, read_rows, row_to_example
from forgetless.devices import model_device
from forgetless.errors import ForgetlessError
from forgetless.eval.scoring import score_processed, score_token_pairs
from forgetless.paths import shared_data_dir
from forgetless.vlm.examples import image_messages
from forgetless.vlm.images import open_image
from forgetless.vlm.processors import is_processor, process, render_multimodal, text_tokenizer
from forgetless.vlm.tasks import image_task_rows

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """'1,000' / '$1000.00' / '1000.' -> '1000'; None if ``text`` is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))  # exact for any length (quantize fails past 28 digits)
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str:
    """The final answer of a response: the number after the last ``####`` (GSM8K style), else
    the last number in the text, else the whole text lower-cased with outer punctuation off."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        match = _NUMBER.search(tail)
        if match and (number := normalize_number(match.group())) is not None:
            return number
    numbers = [n for n in (normalize_number(m) for m in _NUMBER.findall(text)) if n is not None]
    if numbers:
        return numbers[-1]
    return " ".join(text.lower().split()).strip(" .!?\"'")


@dataclass(frozen=True)
class TargetRow:
    """One target example: chat prompt, reference response (scored for NLL), final answer."""

    id: str
    messages: list[dict[str, Any]]
    response: str
    answer: str
    images: tuple[Any, ...] = ()  # paths or PIL images, in the order of the image parts


@dataclass(frozen=True)
class Target:
    """A registered target task: ``load()`` gives its rows in a fixed order."""

    name: str
    load: Callable[[], list[TargetRow]]
    extract: Callable[[str], str] = extract_answer
    max_new_tokens: int = 256


_REGISTRY: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    """Make ``target`` available by name to ``evaluate(target=...)`` and ``--target``."""
    _REGISTRY[target.name] = target
    return target


def registered_targets() -> list[str]:
    return sorted(_REGISTRY)


def get_target(name_or_path: str | Target) -> Target:
    """A registered name, a ``.jsonl`` file of prompt/response rows, or a ``Target``."""
    if isinstance(name_or_path, Target):
        return name_or_path
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() in (".jsonl", ".json", ".csv"):
        if not path.is_file():
            raise ForgetlessError(f"target file not found: {path}")
        return Target(str(path), load=lambda: load_jsonl_rows(path))
    raise ForgetlessError(
        f"unknown target '{name_or_path}': registered are {', '.join(registered_targets())}, "
        "or pass a .jsonl/.json/.csv file of prompt/response rows"
    )


def load_jsonl_rows(path: Path, extract: Callable[[str], str] = extract_answer) -> list[TargetRow]:
    """Rows read as training data is (``forgetless.data``: JSONL/JSON/CSV, ``prompt`` +
    ``response`` or chat ``messages``); an ``answer`` column overrides the extracted answer."""

    rows = []
    for number, data in read_rows(path):
        example = row_to_example(data, f"{path}:{number}", path.parent)
        messages, content = example.messages, example.messages[-1]["content"]
        response = content if isinstance(content, str) else "".join(
            part.get("text", "") for part in content)
        answer = str(data["answer"]) if "answer" in data else extract(response)
        rows.append(TargetRow(str(data.get("id", number)), messages[:-1], response, answer,
                              tuple(example.images)))
    return rows


def _gsm8k_rows() -> list[TargetRow]:
    path = shared_data_dir() / "gsm8k" / "test.jsonl"
    if not path.is_file():
        raise ForgetlessError(f"benchmark gsm8k missing: {path} not found")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        data = json.loads(line)
        gold = normalize_number(data["answer"].rsplit("####", 1)[1]) or ""
        messages = [{"role": "user", "content": data["question"]}]
        rows.append(TargetRow(f"test:{i}", messages, data["answer"], gold))
    return rows


register_target(Target("gsm8k", load=_gsm8k_rows, max_new_tokens=256))


def _count_letters_rows() -> list[TargetRow]:
    """The test split of the synthetic letter-counting task: each distinct question once, at most
    60 per answer, so always answering "1" (or "0") scores about a third, not a half."""

    unique = {row["prompt"]: row["response"] for row in count_letters_rows("test", n=4000)}
    per_answer: dict[str, int] = {}
    rows = []
    for prompt, answer in unique.items():
        per_answer[answer] = per_answer.get(answer, 0) + 1
        if per_answer[answer] <= 60:
            messages = [{"role": "user", "content": prompt}]
            rows.append(TargetRow(f"test:{len(rows)}", messages, answer, answer))
    return rows


register_target(Target("count_letters", load=_count_letters_rows, max_new_tokens=8))


def _largest_number_rows() -> list[TargetRow]:
    """The test split of the synthetic largest-number task, each distinct question once."""

    unique = {row["prompt"]: row["response"] for row in largest_number_rows("test", n=500)}
    return [TargetRow(f"test:{i}", [{"role": "user", "content": prompt}], answer, answer)
            for i, (prompt, answer) in enumerate(unique.items())]


# Room for the base model's chatty "The largest number in the list ... is 92."
register_target(Target("largest_number", load=_largest_number_rows, max_new_tokens=32))


_CLOCK = re.compile(r"(\d{1,2}):(\d{2})")


def extract_clock(text: str) -> str:
    """The last ``H:MM`` time in ``text`` as ``HH:MM`` (``read_clock``'s answers); else the
    text as ``extract_answer`` leaves it."""
    times = _CLOCK.findall(text)
    if times:
        hour, minute = times[-1]
        return f"{int(hour):02d}:{minute}"
    return extract_answer(text)


def _image_task_rows(name: str) -> Callable[[], list[TargetRow]]:
    """The test split of a built-in image task, each distinct picture once."""

    def rows() -> list[TargetRow]:
        unique = {row.key: row for row in image_task_rows(name, "test", n=200)}
        return [TargetRow(f"test:{i}", image_messages(row.prompt), row.response, row.response,
                          (row.image,)) for i, row in enumerate(unique.values())]

    return rows


for _name in ("count_shapes", "name_color", "name_shape", "spatial_relation", "read_digit"):
    register_target(Target(_name, load=_image_task_rows(_name), max_new_tokens=8))
register_target(Target("read_clock", load=_image_task_rows("read_clock"), extract=extract_clock,
                       max_new_tokens=8))


def render_prompt(tokenizer, messages: list[dict[str, Any]]) -> str:
    """The chat-formatted prompt up to the assistant's turn (plain text if no template); a
    VLM's processor renders with its own template and image placeholders."""

    if is_processor(tokenizer):
        return render_multimodal(tokenizer, messages, add_generation_prompt=True)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def answer_nll(model, tokenizer, rows: list[TargetRow], batch_size: int = 8):
    """Per row: (summed NLL of the response tokens after the chat prompt, number of tokens)."""

    if is_processor(tokenizer):  # a VLM: the processor expands the rows' images
        scored = score_processed(
            model, tokenizer, [render_prompt(tokenizer, row.messages) for row in rows],
            [row.response for row in rows],
            [[open_image(image) for image in row.images] for row in rows], batch_size)
        return [(-logprob, count) for logprob, count in scored]
    pairs = []
    for row in rows:
        prompt = render_prompt(tokenizer, row.messages)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        whole = tokenizer.encode(prompt + row.response, add_special_tokens=False)
        pairs.append((prompt_ids, whole[len(prompt_ids) :]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logprobs = score_token_pairs(model, pairs, pad_id=pad_id, batch_size=batch_size)
    return [(-lp, len(cont)) for lp, (_, cont) in zip(logprobs, pairs)]


def generate_greedy(
    model, tokenizer, rows: list[TargetRow] | None, max_new_tokens: int, batch_size: int = 16,
    prompts: list[str] | None = None,
) -> list[str]:
    """Batched greedy completions of the chat prompts (left padding, rows sorted by length);
    with a VLM's processor, each batch (images and all) is built by the processor. Raw text
    ``prompts`` (no chat template; code tasks) replace ``rows``."""

    processor = tokenizer if is_processor(tokenizer) and prompts is None else None
    tokenizer = text_tokenizer(tokenizer)
    if prompts is None:
        prompts = [render_prompt(processor or tokenizer, row.messages) for row in rows or []]
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
            if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id]
    outputs: list[str] = [""] * len(prompts)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                if processor is not None:
                    inputs = dict(process(
                        processor, [prompts[i] for i in chunk],
                        [[open_image(image) for image in rows[i].images] for i in chunk],
                        padding_side="left"))
                else:
                    width = max(len(encoded[i]) for i in chunk)
                    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                    mask = torch.zeros_like(ids)
                    for r, i in enumerate(chunk):
                        ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                        mask[r, width - len(encoded[i]) :] = 1
                    inputs = {"input_ids": ids, "attention_mask": mask}
                width = inputs["input_ids"].shape[1]
                generated = model.generate(
                    **{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()},
                    max_new_tokens=max_new_tokens,
                    do_sample=False, temperature=None, top_p=None, top_k=None,
                    pad_token_id=pad_id, eos_token_id=stop or None,
                )
                new_tokens = generated[:, width:].cpu()  # one copy to the host per batch
                for r, i in enumerate(chunk):
                    outputs[i] = tokenizer.decode(new_tokens[r], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs


# --- ARC-Easy as "answer with the letter" (continual's built-in third task) -------------------

ARC_LETTER = "arc_easy_letter"
_LETTERS = "ABCDEFGH"


def arc_letter_rows(split_file: str) -> list[dict[str, str]]:
    """ARC-Easy questions as prompt/response rows whose response is the option letter."""
    path = shared_data_dir() / "arc" / split_file
    if not path.is_file():
        raise ForgetlessError(f"ARC-Easy data missing: {path} not found")
    rows = []
    for line in path.read_text().splitlines():
        item = json.loads(line)
        choices = item["question"]["choices"]
        labels = [c["label"] for c in choices]
        if item["answerKey"] not in labels or len(choices) > len(_LETTERS):
            continue
        options = "\n".join(f"{_LETTERS[k]}. {c['text']}" for k, c in enumerate(choices))
        prompt = (f"{item['question']['stem']}\n{options}\n"
                  "Answer with the letter of the correct option only.")
        rows.append({"id": item["id"], "prompt": prompt,
                     "response": _LETTERS[labels.index(item["answerKey"])]})
    return rows


def extract_letter(text: str) -> str:
    """The first stand-alone option letter of a reply ("B", "B.", "(B) ...", "Answer: B")."""
    match = re.search(r"(?<![A-Za-z])([A-H])(?![A-Za-z])", text.replace("Answer", ""))
    return match.group(1) if match else text.strip()[:1].upper()


def _arc_letter_test_rows() -> list[TargetRow]:
    return [TargetRow(r["id"], [{"role": "user", "content": r["prompt"]}], r["response"],
                      r["response"]) for r in arc_letter_rows("ARC-Easy-Test.jsonl")]


register_target(Target(ARC_LETTER, load=_arc_letter_test_rows, extract=extract_letter,
                       max_new_tokens=8))


def register_file_target(name: str, path: str) -> str:
    """A held-out ``.jsonl`` as target ``name`` with a generation budget from its longest
    reference (a short-answer task should not generate the default 256 tokens)."""
    rows = get_target(path).load
    longest = max(len(row.response) for row in rows())
    register_target(Target(name, load=rows, max_new_tokens=min(256, max(32, longest + 16))))
    return name
