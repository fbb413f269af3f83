"""Data mixing (replay of general data): ``mix:`` sources interleaved with the task's rows.

The most common advice against forgetting is to train on general data beside the task at some
ratio (LLaMA-Factory's ``interleave_probs``; ~1 % already helps, arXiv 2502.06042; 50 % at twice
the tokens, Google Vertex's samples). Here a ratio is a share of training *examples*
(``forgetless.config.MixSource`` says why) and what it costs in tokens is measured.

The stream is built here, in order, and the Trainer reads it sequentially: position ``p`` goes
to the source whose count lags its share the most (ties to the task), so every prefix of the
stream, hence every run length, holds each source's share to within one example; each source's
rows are drawn in passes of permutations seeded by ``(seed, source)``. The same config and seed
give the same stream for every method (a compare's methods see identical batches), another seed
another one. The stream holds exactly ``max_steps`` x batch x grad_accum x processes examples
(packing: that many blocks), so the rows consumed, and their tokens per source, are known.

Every general source is decontaminated: a row whose text overlaps a held-out item
(``forgetless.overlap``: a shared 8-word n-gram) is dropped, and the count is reported.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets

from forgetless.data import IGNORE_INDEX, Example, load_examples, pack, tokenize_conversation
from forgetless.errors import ForgetlessError
from forgetless.eval import builtin_tasks, get_target, load_spec, load_task, registered_targets
from forgetless.models import is_processor
from forgetless.overlap import OverlapIndex
from forgetless.paths import cache_dir
from forgetless.rehearsal import DEFAULT_N, read_prompt_pool, rehearse
from forgetless.vlm.images import open_image
from forgetless.vlm.processors import process, render_multimodal

SELF = "self"
DEFAULT_EXCLUDE_TARGETS = ("gsm8k",)  # + every built-in held-out task (default_exclude)


def default_exclude() -> list[str]:
    """What a mixed row may not overlap unless ``exclude:`` says otherwise: every built-in
    held-out task (all of its evaluation split, not only the items a run samples) and the
    gsm8k test split."""
    return [*builtin_tasks(), *DEFAULT_EXCLUDE_TARGETS]


# --- reading and checking sources -----------------------------------------------------------


def _stamp(source: str) -> tuple[int, int] | None:
    """A file's (mtime, size), so the read cache notices an edited file."""
    try:
        stat = Path(source).expanduser().stat()
    except (OSError, ValueError, RuntimeError):
        return None
    return stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=16)
def _examples(source: str, split: str, stamp: tuple[int, int] | None) -> tuple[Example, ...]:
    return tuple(load_examples(source, split))


def source_examples(source: str, split: str = "train") -> list[Example]:
    """A general source's rows (read once per process while the file is unchanged)."""
    return list(_examples(source, split, _stamp(source)))


def check_source(mix: Any) -> None:
    """A ``MixSource`` is usable: its rows (or prompt pool) read, its held-out names exist.
    Runs when the config is validated, so a bad source fails before any model loads."""
    where = f"mix source '{mix.source}'"
    if mix.source == SELF:
        if mix.prompts is not None:

            try:
                read_prompt_pool(mix.prompts)
            except ForgetlessError as err:
                raise ForgetlessError(f"{where}: {err}") from None
    else:
        given = [key for key in ("n", "prompts", "seed") if getattr(mix, key) is not None]
        if given:
            raise ForgetlessError(f"{where}: {', '.join(given)}: only for source 'self'")
        try:
            source_examples(mix.source, mix.split)
        except ForgetlessError as err:
            raise ForgetlessError(f"{where}: {err}") from None
    for name in mix.exclude or []:
        _check_heldout(name, where)


def _check_heldout(name: str, where: str) -> None:

    try:
        if name in registered_targets() or Path(name).suffix.lower() in (".jsonl", ".csv",
                                                                         ".json"):
            get_target(name)
        else:
            load_spec(name)
    except ForgetlessError as err:
        raise ForgetlessError(f"{where}: exclude: {err}") from None


@lru_cache(maxsize=4)
def _heldout(names: tuple[str, ...]) -> tuple[tuple[str, ...], OverlapIndex]:

    texts: list[str] = []
    for name in names:
        if name in registered_targets() or Path(name).suffix.lower() in (".jsonl", ".csv",
                                                                         ".json"):
            for row in get_target(name).load():  # the question: worked answers share phrasing
                texts.append(" ".join(m["content"] for m in row.messages
                                      if isinstance(m.get("content"), str)))
        else:
            for item in load_task(load_spec(name), None, 0).items:
                context, continuation = item.requests[item.gold]
                texts.append(f"{context} {continuation}")
    return tuple(texts), OverlapIndex(texts)


def heldout_texts(names: list[str] | None = None) -> list[str]:
    """The held-out items' texts (a task item's context + gold answer, a target row's
    prompt) of ``names`` (default:
    ``default_exclude()``), for the overlap check."""
    names = default_exclude() if names is None else names
    return list(_heldout(tuple(names))[0])


def heldout_index(names: list[str] | None = None) -> OverlapIndex | None:
    names = default_exclude() if names is None else names
    return _heldout(tuple(names))[1] if names else None


def example_text(example: Example) -> str:
    """Every text of a conversation, for the overlap check."""
    parts = []
    for message in example.messages:
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [part["text"] for part in content if part.get("type") == "text"]
    return "\n".join(parts)


# --- the stream -----------------------------------------------------------------------------


def interleave(shares: list[float]) -> Iterator[int]:
    """Source indices, position by position: each goes to the source lagging its share the
    most (ties to the lower index), so every prefix of length L holds ``share * L`` of each
    source to within one."""
    counts = [0] * len(shares)
    position = 0
    while True:
        position += 1
        lag = [share * position - count for share, count in zip(shares, counts, strict=True)]
        chosen = max(range(len(shares)), key=lambda i: (lag[i], -i))
        counts[chosen] += 1
        yield chosen


def draws(size: int, seed: int, source: int) -> Iterator[int]:
    """Row indices of one source: passes of permutations, each seeded by (seed, source, pass),
    so the first k draws do not depend on how many follow."""
    rng = random.Random(f"mix:{seed}:{source}")
    while True:
        order = list(range(size))
        rng.shuffle(order)
        yield from order


def processes() -> int:
    """Processes of an ``accelerate launch`` (each reads its own batches of the stream)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


@dataclass
class MixedData:
    """The mixed training set in training order, with what each row holds per source."""

    dataset: Any  # datasets.Dataset of token ids, or a list of Example for a VLM
    names: list[str]  # source names; 0 is the task data
    shares: list[float]  # example shares, 0 = the task's
    parts: list[list[tuple[int, int, int]]]  # per row: (source, tokens, target tokens) each
    max_steps: int
    rows_per_step: int
    info: list[dict[str, Any]] = field(default_factory=list)  # per source: rows, dropped, ...
    budget: str = "steps"

    def summary(self, steps: int) -> dict[str, Any]:
        """Examples and tokens of each source among the rows ``steps`` optimizer steps read."""
        consumed = self.parts[: steps * self.rows_per_step]
        examples = [0] * len(self.names)
        tokens = [0] * len(self.names)
        targets = [0] * len(self.names)
        for row in consumed:
            for source, count, target in row:
                examples[source] += 1
                tokens[source] += count
                targets[source] += target
        total_examples, total_tokens = sum(examples), sum(tokens)
        sources = []
        vlm = isinstance(self.dataset, list)  # the processor's label spans are not counted here
        for i, name in enumerate(self.names):
            sources.append({
                "name": name, "ratio": self.shares[i], "examples": examples[i],
                "example_share": examples[i] / total_examples if total_examples else 0.0,
                "tokens": tokens[i],
                "token_share": tokens[i] / total_tokens if total_tokens else 0.0,
                "target_tokens": None if vlm else targets[i],
                **(self.info[i] if i < len(self.info) else {}),
            })
        return {
            "ratio_of": "examples", "budget": self.budget, "steps": steps,
            "sources": sources, "tokens_seen": total_tokens, "task_tokens_seen": tokens[0],
            # tokens spent per task token: 1 unmixed, about 2 for half general data of equal
            # length; with budget "task" the run also took that many more steps
            "token_multiplier": total_tokens / tokens[0] if tokens[0] else None,
        }


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the log: shares and the token budget the mix cost."""
    general = ", ".join(f"{s['name']} {100 * s['example_share']:.0f}%"
                        for s in summary["sources"][1:])
    multiplier = summary["token_multiplier"]
    times = f" = {multiplier:.2f}x the task's own {summary['task_tokens_seen']:,}" if (
        multiplier) else ""
    return f"mix: {general} of the examples; {summary['tokens_seen']:,} tokens seen{times}"


def scaled_steps(max_steps: int, mix: list[Any], budget: str) -> int:
    """The run's optimizer steps: ``max_steps``, or with budget "task" as many more as keep
    the task examples seen equal to an unmixed run's."""
    if not mix or budget != "task":
        return max_steps
    return math.ceil(max_steps / (1.0 - sum(source.ratio for source in mix)))


Rehearsal = Callable[[Any], tuple[list[Example], dict[str, Any]]]


def rehearsal_source(model: Any, tokenizer: Any, seed: int) -> Rehearsal:
    """``build_mixed``'s way to the ``self`` rows: ``model`` (the base, before training)
    answers, cached under ``forgetless.paths.cache_dir()``; seed: the source's or the run's."""

    def make(mix: Any) -> tuple[list[Example], dict[str, Any]]:
        record = rehearse(
            model, tokenizer, n=mix.n or DEFAULT_N, seed=seed if mix.seed is None else mix.seed,
            excluded=heldout_texts(mix.exclude),
            prompts=read_prompt_pool(mix.prompts) if mix.prompts else None,
            max_new_tokens=mix.max_new_tokens, cache=cache_dir(),
        )
        info = {"rehearsal": {**record["stats"], "mode": record["recipe"]["mode"],
                              "cache": record["cache"], "reused": record["reused"],
                              "seconds": round(record["seconds"], 1)}}
        return [Example(messages) for messages in record["conversations"]], info

    return make


def build_mixed(config: Any, tokenizer: Any, rehearsal: Rehearsal | None = None) -> MixedData:
    """The training set of ``config`` (a TrainConfig with ``mix``) as one ordered stream.

    ``rehearsal(mix_source)`` returns the ``self`` source's conversations (generated by the
    base model, ``forgetless.rehearsal``); the caller supplies it because it needs the model."""
    vlm = is_processor(tokenizer)
    if vlm and config.packing:
        raise ForgetlessError("packing: not supported for a vision-language model "
                              "(its processor builds each example's image tokens)")
    task = load_examples(config.data, "train")
    order = list(range(len(task)))
    random.Random(config.seed).shuffle(order)  # the rows build_dataset would train on
    if config.limit is not None:
        order = order[: config.limit]
    pools: list[list[Example]] = [[task[i] for i in order]]
    names, info = [f"{config.data} (task)"], [{"rows": len(order)}]
    for mix in config.mix:
        if mix.source == SELF:
            if rehearsal is None:
                raise ForgetlessError("mix source 'self' needs the model: train() generates it")
            rows, extra = rehearsal(mix)
        else:
            rows = source_examples(mix.source, mix.split)
            index = heldout_index(mix.exclude)
            before = len(rows)
            if index is not None:
                rows = [row for row in rows if not index.overlaps(example_text(row))]
            extra = {"rows_read": before, "dropped_overlap_heldout": before - len(rows)}
        if not rows:
            raise ForgetlessError(f"mix source '{mix.source}': no rows left (every row overlaps "
                                  "a held-out item, or none was generated)")
        pools.append(rows)
        names.append(mix.source)
        info.append({"rows": len(rows), **extra})
    if not vlm and any(example.images for pool in pools for example in pool):
        raise ForgetlessError("mix: rows with images need a vision-language model (one whose "
                              "config has a vision_config); this model has a tokenizer only")
    shares = [1.0 - sum(m.ratio for m in config.mix), *(m.ratio for m in config.mix)]
    steps = scaled_steps(config.max_steps, config.mix, config.mix_budget)
    rows_per_step = config.batch_size * config.grad_accum * processes()
    needed = steps * rows_per_step
    common = dict(names=names, shares=shares, max_steps=steps, rows_per_step=rows_per_step,
                  info=info, budget=config.mix_budget)
    if vlm:
        chosen = _stream(pools, shares, config.seed, needed, lambda s, i: True)
        examples = [pools[s][i] for s, i in chosen]
        lengths = _vlm_lengths(tokenizer, pools, chosen)
        return MixedData(examples, parts=[[(s, n, 0)] for (s, _), n in zip(chosen, lengths,
                                                                            strict=True)],
                         **common)
    cache: dict[tuple[int, int], dict | None] = {}

    def tokenized(source: int, index: int) -> dict | None:
        if (source, index) not in cache:
            row = tokenize_conversation(tokenizer, pools[source][index].messages,
                                        config.max_length)
            keep = any(label != IGNORE_INDEX for label in row["labels"])
            cache[(source, index)] = row if keep else None
        return cache[(source, index)]

    def usable(source: int, index: int) -> bool:
        return tokenized(source, index) is not None

    length = needed
    while True:
        chosen = _stream(pools, shares, config.seed, length, usable)
        rows = [tokenized(s, i) for s, i in chosen]
        if not config.packing:
            parts = [[(s, len(r["input_ids"]), _targets(r))] for (s, _), r in zip(chosen, rows,
                                                                                   strict=True)]
            break
        blocks = pack(rows, config.max_length)
        if len(blocks) >= needed:
            rows, parts = blocks[:needed], _block_parts(blocks[:needed], chosen, rows)
            break
        length *= 2  # the stream is prefix-stable: a longer one extends the shorter
    return MixedData(datasets.Dataset.from_list(rows), parts=parts, **common)


def _targets(row: dict) -> int:
    return sum(label != IGNORE_INDEX for label in row["labels"])


def _stream(pools: list[list[Example]], shares: list[float], seed: int, length: int,
            usable: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    """``length`` (source, row) pairs; a row ``usable`` rejects (no response token within
    max_length) is skipped for the source's next draw."""
    sources = [draws(len(pool), seed, s) for s, pool in enumerate(pools)]
    out: list[tuple[int, int]] = []
    for source in interleave(shares):
        if len(out) == length:
            return out
        for _ in range(2 * len(pools[source]) + 1):  # two passes hold every row at least once
            index = next(sources[source])
            if usable(source, index):
                break
        else:
            raise ForgetlessError(f"mix: no row of source {source} (0: the task) keeps a "
                                  "response token within max_length: raise max_length")
        out.append((source, index))
    return out


def _block_parts(blocks: list[dict], chosen: list[tuple[int, int]],
                 rows: list[dict]) -> list[list[tuple[int, int, int]]]:
    """Which examples each packed block holds: ``pack`` concatenates whole examples in order,
    so a block's length is the sum of the lengths of the examples it took."""
    parts, position = [], 0
    for block in blocks:
        size, held = len(block["input_ids"]), []
        while size > 0:
            row = rows[position]
            held.append((chosen[position][0], len(row["input_ids"]), _targets(row)))
            size -= len(row["input_ids"])
            position += 1
        parts.append(held)
    return parts


def _vlm_lengths(processor: Any, pools: list[list[Example]],
                 chosen: list[tuple[int, int]]) -> list[int]:
    """Tokens of each chosen example as the processor builds it (image tokens included),
    counted once per distinct row."""
    lengths: dict[tuple[int, int], int] = {}
    out = []
    for key in chosen:
        if key not in lengths:
            example = pools[key[0]][key[1]]
            text = render_multimodal(processor, example.messages)
            images = [open_image(image) for image in example.images]
            lengths[key] = int(process(processor, [text], [images])["input_ids"].shape[1])
        out.append(lengths[key])
    return out
