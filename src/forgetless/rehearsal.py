"""Self-rehearsal: general conversations the base model writes itself, before training.

When no general data is at hand, the base model's own behaviour is the thing to keep: train on
its answers to general prompts beside the task (self-synthesised rehearsal, arXiv 2403.01244).
The prompts come from a pool the user gives, or, with none, Magpie-style (arXiv 2406.08464):
the instruct model is given only the chat template's prefix up to the user's text, writes an
instruction (sampled, temperature 1), and then answers it (greedy: its most likely behaviour).

A VLM rehearses text only (no images are generated): its language model's answers to text
prompts, which its training then keeps; image behaviour is not rehearsed.

Rows are deduplicated by normalised prompt, and a row whose prompt or answer overlaps a
held-out item (``forgetless.overlap``: a shared 8-word n-gram) is dropped, so rehearsal cannot
leak the evaluation into training. Generation is slow on a CPU, so it is cached by (model
weights, recipe, seed) under ``<cache>/rehearsal/<key>/``: chunks of ``CHUNK`` candidates are
written atomically as they finish (an interrupted run resumes at the next chunk, and each chunk
draws from its own seed, so a resumed cache equals an uninterrupted one), and
``rehearsal.json``, written last, marks it complete and is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forgetless.data import Messages, read_rows, render
from forgetless.errors import ForgetlessError
from forgetless.io import atomic_write_json, atomic_write_text, fault_point
from forgetless.models import is_processor
from forgetless.overlap import OverlapIndex, normalized
from forgetless.vlm.processors import render_multimodal

# conversations. Measured on SmolLM2-135M, Magpie, one CPU thread: n=64 took 6 chunks (96
# candidates: 23 instructions unfinished within 64 tokens, 1 held-out overlap), 220 CPU s; 51
# of the 64 answers reached the 128-token cap (kept, cut: raise max_new_tokens for whole ones).
DEFAULT_N = 64
CHUNK = 16  # candidates generated per batch and written per cache file
INSTRUCTION_TOKENS = 64  # an instruction longer than this is dropped (unfinished)
ATTEMPTS = 4  # Magpie draws at most ATTEMPTS x n candidates to find n distinct, clean ones
VERSION = 1  # of the recipe: a change in how rows are made starts a new cache
_SENTINEL = "\u2063FORGETLESS-USER-TEXT\u2063"


def _is_processor(tokenizer: Any) -> bool:

    return is_processor(tokenizer)


def _text_tokenizer(tokenizer: Any) -> Any:
    return tokenizer.tokenizer if _is_processor(tokenizer) else tokenizer


def _render(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    if _is_processor(tokenizer):
        return render_multimodal(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return render(tokenizer, messages, add_generation_prompt=add_generation_prompt)


def user_prefix(tokenizer: Any) -> str:
    """The chat template's text up to where the user's words start (Magpie's query)."""
    if not _is_processor(tokenizer) and not getattr(tokenizer, "chat_template", None):
        raise ForgetlessError("mix source 'self' without prompts needs a chat template (Magpie "
                              "writes the instruction after the user prefix); give prompts:")
    text = _render(tokenizer, [{"role": "user", "content": _SENTINEL}], False)
    if _SENTINEL not in text:
        raise ForgetlessError("mix source 'self': the chat template does not show the user's "
                              "text; give prompts:")
    return text[: text.index(_SENTINEL)]


def model_fingerprint(model: Any, samples: int = 4096) -> str:
    """A cheap identity of the weights: names, shapes, dtypes and ``samples`` strided values per
    tensor, so a cache made by the base is not reused for a tuned model (continual stage 2)."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def read_prompt_pool(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` file (one per line) or rows with ``prompt`` or ``messages``
    (the last user turn) in JSONL/JSON/CSV."""

    path = Path(path).expanduser()
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise ForgetlessError(f"prompt pool not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ForgetlessError(f"{path}: cannot read the prompt pool ({err})") from None
        prompts = [line.strip() for line in lines if line.strip()]
    else:
        prompts = []
        for number, row in read_rows(path):
            messages = row.get("messages")
            if isinstance(messages, list):
                users = [m.get("content") for m in messages
                         if isinstance(m, dict) and m.get("role") == "user"]
                text = users[-1] if users else None
            else:
                text = row.get("prompt")
            if not isinstance(text, str) or not text.strip():
                raise ForgetlessError(f"{path}:{number}: a prompt row needs a string 'prompt' "
                                      "(or 'messages' with a user turn)")
            prompts.append(text.strip())
    if not prompts:
        raise ForgetlessError(f"{path}: the prompt pool is empty")
    return prompts


def _sha(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def _generate(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int,
              sample: bool, seed: int) -> list[tuple[str, bool]]:
    """Continuations of ``texts`` (one batch, left-padded) and whether each ended by itself."""
    import torch
    from transformers import GenerationConfig

    text_tok = _text_tokenizer(tokenizer)
    side, text_tok.padding_side = text_tok.padding_side, "left"
    try:
        batch = text_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        text_tok.padding_side = side
    stops = _stop_ids(model, text_tok)
    pad = text_tok.pad_token_id if text_tok.pad_token_id is not None else min(stops)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                              temperature=1.0 if sample else None, top_p=1.0 if sample else None,
                              top_k=0 if sample else None, pad_token_id=pad,
                              eos_token_id=sorted(stops))
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device),
                             generation_config=config)
    results = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        ended = next((i for i, token in enumerate(row) if token in stops), None)
        kept = row if ended is None else row[:ended]
        results.append((text_tok.decode(kept, skip_special_tokens=True).strip(),
                        ended is not None))
    return results


class _Filter:
    """Keeps a candidate that is complete, new (normalised prompt) and clean (no overlap)."""

    def __init__(self, excluded: OverlapIndex | None) -> None:
        self.excluded = excluded
        self.seen: set[str] = set()
        self.stats = {"candidates": 0, "kept": 0, "unfinished": 0, "empty": 0,
                      "duplicates": 0, "overlap_heldout": 0, "answers_truncated": 0}

    def prompt_ok(self, prompt: str) -> bool:
        key = normalized(prompt)
        if not key:
            self.stats["empty"] += 1
            return False
        if key in self.seen:
            self.stats["duplicates"] += 1
            return False
        if self.excluded is not None and self.excluded.overlaps(prompt):
            self.stats["overlap_heldout"] += 1
            return False
        self.seen.add(key)
        return True

    def take(self, row: dict[str, Any]) -> bool:
        self.stats["candidates"] += 1
        if not row["instruction_finished"]:
            self.stats["unfinished"] += 1
            return False
        if not row["response"]:
            self.stats["empty"] += 1
            return False
        if not self.prompt_ok(row["prompt"]):
            return False
        if self.excluded is not None and self.excluded.overlaps(row["response"]):
            self.seen.discard(normalized(row["prompt"]))
            self.stats["overlap_heldout"] += 1
            return False
        self.stats["answers_truncated"] += not row["answer_finished"]
        self.stats["kept"] += 1
        return True


def rehearsal_conversations(
    model: Any,
    tokenizer: Any,
    n: int = DEFAULT_N,
    seed: int = 0,
    excluded: Sequence[str] = (),
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 128,
    cache: str | Path | None = None,
    model_key: str | None = None,
) -> list[Messages]:
    """``n`` (or fewer, when the pool or the attempts run out) user/assistant conversations
    written by ``model``: its answers to ``prompts``, or to instructions it writes itself.
    ``excluded``: held-out texts no prompt or answer may overlap. ``cache``: a folder for the
    resumable cache (``<cache>/rehearsal/<key>``); None generates in memory. ``model_key``
    names the weights in the cache key (default: ``model_fingerprint``)."""
    return rehearse(model, tokenizer, n, seed, excluded, prompts, max_new_tokens, cache,
                    model_key)["conversations"]


def rehearse(model: Any, tokenizer: Any, n: int = DEFAULT_N, seed: int = 0,
             excluded: Sequence[str] = (), prompts: Sequence[str] | None = None,
             max_new_tokens: int = 128, cache: str | Path | None = None,
             model_key: str | None = None) -> dict[str, Any]:
    """``rehearsal_conversations`` with its record: recipe, counts (``stats``), cache folder,
    whether the cache was reused, and the generation seconds of this call."""
    import random
    import time

    if n < 1:
        raise ForgetlessError("self-rehearsal: n must be at least 1")
    text_tok = _text_tokenizer(tokenizer)
    pool = None
    if prompts is not None:
        pool = [p.strip() for p in prompts if p and p.strip()]
        if not pool:
            raise ForgetlessError("self-rehearsal: the prompt pool is empty")
    template = getattr(text_tok, "chat_template", None) or getattr(tokenizer, "chat_template",
                                                                   None) or ""
    recipe = {
        "version": VERSION, "mode": "pool" if pool is not None else "magpie", "n": n,
        "seed": seed, "max_new_tokens": max_new_tokens, "instruction_tokens": INSTRUCTION_TOKENS,
        "chunk": CHUNK, "pool": _sha(pool) if pool is not None else None,
        "excluded": _sha(sorted(excluded)), "template": _sha([template]),
        "model": model_key or model_fingerprint(model),
    }
    folder = None
    if cache is not None:
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:20]
        folder = Path(cache) / "rehearsal" / key
        done = folder / "rehearsal.json"
        if done.is_file():
            record = json.loads(done.read_text(encoding="utf-8"))
            return {**record, "cache": str(folder), "reused": True, "seconds": 0.0}
        atomic_write_json(folder / "recipe.json", recipe)

    index = OverlapIndex(excluded) if excluded else None
    keep = _Filter(index)
    order: list[str] = []
    if pool is not None:  # clean the pool first: no generation for prompts that would be dropped
        shuffled = list(pool)
        random.Random(f"rehearsal:{seed}").shuffle(shuffled)
        order = [p for p in shuffled if keep.prompt_ok(p)]
        keep.seen.clear()
        limit = math.ceil(len(order) / CHUNK)
    else:
        prefix = user_prefix(tokenizer)
        limit = math.ceil(ATTEMPTS * n / CHUNK)
    was_training = getattr(model, "training", False)
    model.eval()
    rows: list[dict[str, Any]] = []
    started, generated = time.perf_counter(), 0
    try:
        for chunk in range(limit):
            part = folder / f"chunk-{chunk:05d}.jsonl" if folder is not None else None
            if part is not None and part.is_file():
                batch = [json.loads(line) for line in part.read_text().splitlines() if line]
            else:
                batch = _chunk(model, tokenizer, chunk, seed, max_new_tokens,
                               order[chunk * CHUNK:(chunk + 1) * CHUNK] if pool is not None
                               else None, None if pool is not None else prefix)
                generated += len(batch)
                if part is not None:
                    atomic_write_text(part, "".join(json.dumps(r) + "\n" for r in batch))
                    fault_point("rehearsal.chunk")
            rows += [row for row in batch if keep.take(row)]
            print(f"[forgetless] self-rehearsal: {min(len(rows), n)}/{n} conversations "
                  f"(chunk {chunk + 1}, {time.perf_counter() - started:.0f} s)", flush=True)
            if len(rows) >= n:
                break
    finally:
        model.train(was_training)
    rows = rows[:n]
    keep.stats["kept"] = len(rows)
    record = {
        "recipe": recipe, "stats": keep.stats,
        "conversations": [[{"role": "user", "content": r["prompt"]},
                           {"role": "assistant", "content": r["response"]}] for r in rows],
    }
    if folder is not None:
        atomic_write_json(folder / "rehearsal.json", record)  # last: the cache is complete
    seconds = time.perf_counter() - started
    return {**record, "cache": str(folder) if folder else None, "reused": False,
            "seconds": seconds, "generated": generated}


def _chunk(model: Any, tokenizer: Any, chunk: int, seed: int, max_new_tokens: int,
           pool: list[str] | None, prefix: str | None) -> list[dict[str, Any]]:
    """One batch of candidates: instructions (Magpie) or pool prompts, then the answers."""
    base = int(hashlib.sha256(f"rehearsal:{seed}:{chunk}".encode()).hexdigest()[:8], 16)
    if pool is None:
        made = _generate(model, tokenizer, [prefix] * CHUNK, INSTRUCTION_TOKENS, True, base)
    else:
        made = [(prompt, True) for prompt in pool]
    rows = [{"prompt": text, "instruction_finished": ended, "response": "",
             "answer_finished": False} for text, ended in made]
    todo = [row for row in rows if row["instruction_finished"] and row["prompt"]]
    if todo:
        texts = [_render(tokenizer, [{"role": "user", "content": row["prompt"]}], True)
                 for row in todo]
        for row, (answer, ended) in zip(todo, _generate(model, tokenizer, texts, max_new_tokens,
                                                        False, base + 1), strict=True):
            row["response"], row["answer_finished"] = answer, ended
    return rows
