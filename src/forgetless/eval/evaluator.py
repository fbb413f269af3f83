"""``evaluate``: held-out suite + target task + drift against the base, in one result."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

import forgetless
from forgetless.errors import ForgetlessError
from forgetless.eval.consent import check_code_execution, require_code_consent
from forgetless.eval.drift import DriftPrompt, kl_and_number_mass, param_drift
from forgetless.eval.result import METRICS_VERSION, EvalResult
from forgetless.eval.sandbox import run_python
from forgetless.eval.scoring import (
    check_model_tokenizer,
    encode_pair,
    score_processed,
    score_requests,
)
from forgetless.eval.stats import (
    bootstrap_metric,
    combine_intervals,
    mean_metric,
    proportion_metric,
)
from forgetless.eval.targets import Target, answer_nll, generate_greedy, get_target
from forgetless.eval.tasks import LoadedTask, TaskSpec, load_spec, load_task, sample_indices
from forgetless.vlm.examples import image_messages
from forgetless.vlm.images import open_image
from forgetless.vlm.processors import is_processor, render_multimodal, text_tokenizer

DEFAULT_SUITE = ("arc_easy", "piqa")
FULL_SUITE = ("arc_easy", "piqa", "mmlu", "winogrande")
DEFAULT_LIMIT = 200
DEFAULT_DRIFT_PROMPTS = 64
# Per-task held-out measures, each also averaged over the suite as ``heldout/<measure>``
# (``heldout/acc`` averages each task's 0/1 score: ``acc``, or ``pass@1`` for a code task).
HELDOUT_MEASURES = ("acc", "gold_logprob", "margin")
# A task's 0/1 score when it is not ``acc``: code execution, named as lm-eval and the code
# leaderboards name it (results measured before were ``<task>/acc``; ``EvalResult`` renames).
SCORE_OF_OUTPUT = {"generate_until": "pass@1"}


def evaluate(
    model,
    tokenizer,
    suite: Sequence[str | TaskSpec] = DEFAULT_SUITE,
    limit: int | Mapping[str, int | None] | None = DEFAULT_LIMIT,
    seed: int = 0,
    target: str | Target | None = None,
    target_limit: int | None = 100,
    base_model=None,
    drift_prompts: Sequence[DriftPrompt] | None = None,
    batch_size: int = 16,
    num_fewshot: int | None = None,
    model_name: str | None = None,
    base_name: str | None = None,
    exclude: Mapping[str, Collection[int]] | None = None,
    confirm_run_unsafe_code: bool = False,
    allow_unisolated_code: bool = False,
) -> EvalResult:
    """Score ``model`` on the held-out ``suite``, optionally a ``target`` task and drift from
    ``base_model``. ``limit`` is items per task (an int, or task -> int; None = all), chosen
    with ``seed``. See the package docstring for the metric names. Both models are evaluated
    where they are (inputs go to their device; nothing moves them) in their own dtype.
    ``exclude`` maps a task or target name to row indices its sample must not use (a test
    sample disjoint from a validation one). ``tokenizer`` may be a vision-language model's
    processor (as ``load_model`` returns it): then tasks, targets and drift prompts with
    images are scored with their images. A code task (humaneval) runs model-written programs:
    only with ``confirm_run_unsafe_code`` (or ``HF_ALLOW_CODE_EVAL=1``), and where the sandbox
    cannot isolate them only with ``allow_unisolated_code`` too (``forgetless.eval.consent``)."""
    check_model_tokenizer(model, tokenizer)
    # before anything is scored: no code runs without an opt-in
    require_code_consent(suite, confirm_run_unsafe_code, allow_unisolated_code)
    started = time.perf_counter()
    result = EvalResult()
    provenance = _provenance(model, model_name, base_model, base_name, seed, limit, num_fewshot)
    provenance["tasks"] = {}
    loaded_tasks = []
    pooled: dict[str, list] = {measure: [] for measure in HELDOUT_MEASURES}
    for entry in suite:
        spec = load_spec(entry)
        task_limit = (_per_task(limit, entry, spec.name, DEFAULT_LIMIT)
                      if isinstance(limit, Mapping) else limit)
        skip = _per_task(exclude or {}, entry, spec.name, ())
        loaded = load_task(spec, task_limit, seed, num_fewshot or 0, skip)
        loaded_tasks.append(loaded)
        records, metrics = score_task(model, tokenizer, loaded, batch_size)
        _progress(f"{spec.name}: {len(records)} items", started)
        result.per_item[spec.name] = records
        result.metrics.update(metrics)
        for measure in HELDOUT_MEASURES:  # a code task has no margin (one answer, no choices)
            name = SCORE_OF_OUTPUT.get(spec.output_type, measure) if measure == "acc" else measure
            key = f"{spec.name}/{name}"
            if key in metrics:
                pooled[measure].append(metrics[key])
        provenance["tasks"][spec.name] = {
            "split": spec.split, "available": loaded.total, "n": len(loaded.items),
            "limit": task_limit, "num_fewshot": num_fewshot or 0, "files": loaded.files,
        }
        if skip:
            provenance["tasks"][spec.name]["excluded"] = len(set(skip))
    for measure, per_task in pooled.items():
        if per_task:
            result.metrics[f"heldout/{measure}"] = combine_intervals(per_task)
    if target is not None:
        resolved = get_target(target)
        name, records, metrics, info = _score_target(
            model, tokenizer, resolved, target_limit, seed, batch_size,
            _per_task(exclude or {}, target, resolved.name, ()),
        )
        result.per_item[name] = records
        result.metrics.update(metrics)
        provenance["target"] = info
        _progress(f"target {name}: {len(records)} items", started)
    if base_model is not None:
        check_model_tokenizer(base_model, tokenizer)
        prompts = list(drift_prompts) if drift_prompts else default_drift_prompts(loaded_tasks)
        if prompts:
            drift = kl_and_number_mass(model, base_model, tokenizer, prompts)
            result.metrics.update({f"drift/{k}": m for k, m in drift.items()})
            provenance["drift_prompts_sha256"] = _sha(prompts)
            provenance["drift_prompts_n"] = len(prompts)
        result.param_drift = param_drift(model, base_model).to_dict()
    provenance["seconds"] = round(time.perf_counter() - started, 2)
    result.provenance = provenance
    return result


def _per_task(mapping: Mapping[str, Any], entry: Any, name: str, default: Any) -> Any:
    """A per-task setting keyed by what the user wrote (a built-in name or a .yaml path) or by
    the task's own name: a path given in the suite must not silently miss its setting. (A suite
    entry may also be a loaded spec: then only its name keys.)"""
    if isinstance(entry, str) and entry in mapping:
        return mapping[entry]
    return mapping.get(name, default)


def sampled_rows(name: str, limit: int | None, seed: int, target: bool = False) -> list[int]:
    """The row indices ``evaluate`` samples for a held-out task (or, ``target=True``, a
    target) with this ``limit`` and ``seed``: pass them as ``exclude`` for a disjoint sample."""
    if target:
        total = len(get_target(name).load())
        if limit is None or limit >= total:
            return list(range(total))
        return sorted(int(i) for i in np.random.default_rng(seed).choice(total, limit,
                                                                         replace=False))

    return sample_indices(load_task(load_spec(name), None, seed).total, limit, seed)


def _progress(done: str, started: float) -> None:
    """One line per finished part, so a long CPU evaluation shows it is moving (stderr)."""
    print(f"[forgetless eval] {done} ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
          flush=True)


def default_drift_prompts(
    tasks: Sequence[LoadedTask], n: int = DEFAULT_DRIFT_PROMPTS
) -> list[DriftPrompt]:
    """Held-out contexts (first request of each item), dealt round-robin across tasks; an
    image item's context comes with its images."""
    pools = [[(item.requests[0][0], item.images) if item.images else item.requests[0][0]
              for item in task.items] for task in tasks]
    prompts: list[DriftPrompt] = []
    for i in range(max((len(p) for p in pools), default=0)):
        prompts += [pool[i] for pool in pools if i < len(pool)]
    return prompts[:n]


def choice_measures(lls: np.ndarray, gold: int) -> tuple[float, float]:
    """(gold log-probability among the choices, margin over the best wrong choice), in nats.

    Continuous twins of ``correct``: the choices' log-likelihoods are log-softmaxed over the
    choices (the normalisation ``acc`` uses: raw sums, no length division), so a model that grows
    less sure of the right answer shows it before any argmax flips. ``margin > 0`` iff correct.
    """
    lls = np.asarray(lls, dtype=np.float64)
    top = lls.max()
    log_total = top + np.log(np.exp(lls - top).sum())
    wrong = np.delete(lls, gold)
    margin = float(lls[gold] - wrong.max()) if wrong.size else math.nan
    return float(lls[gold] - log_total), margin


def score_task(model, tokenizer, loaded: LoadedTask, batch_size: int = 16):
    """Per-item records and ``<task>/acc`` (+ ``acc_norm``), ``gold_logprob`` and ``margin``
    Metrics for one loaded task."""
    name = loaded.spec.name
    if not loaded.items:
        raise ForgetlessError(f"task '{name}' has no items")
    if loaded.spec.generates:
        return score_code_task(model, tokenizer, loaded, batch_size)
    scores = _item_scores(model, tokenizer, loaded, batch_size)
    records, offset = [], 0
    for item in loaded.items:
        lls = np.array(scores[offset : offset + len(item.requests)])
        offset += len(item.requests)
        pred = int(np.argmax(lls))
        pred_norm = int(np.argmax(lls / np.array(item.norm_lengths, dtype=np.float64)))
        gold_logprob, margin = choice_measures(lls, item.gold)
        records.append({
            "id": item.id, "pred": pred, "gold": item.gold, "correct": int(pred == item.gold),
            "pred_norm": pred_norm, "correct_norm": int(pred_norm == item.gold),
            "loglikelihoods": [round(float(x), 5) for x in lls],
            "gold_logprob": round(gold_logprob, 6), "margin": round(margin, 6),
        })
    metrics = {f"{name}/acc": proportion_metric([r["correct"] for r in records])}
    if "acc_norm" in loaded.spec.metrics:
        metrics[f"{name}/acc_norm"] = proportion_metric([r["correct_norm"] for r in records])
    metrics[f"{name}/gold_logprob"] = mean_metric([r["gold_logprob"] for r in records])
    metrics[f"{name}/margin"] = mean_metric([r["margin"] for r in records])
    return records, metrics


def score_code_task(model, tokenizer, loaded: LoadedTask, batch_size: int = 16):
    """A ``generate_until`` task: greedy completion cut at the first stop string, run with the
    item's check code in ``forgetless.eval.sandbox`` (never in this process) -> ``pass@1``;
    ``gold_logprob`` = log p(reference | prompt) per reference token (nats/token), paired per
    item: per token, so that pooling it with multiple-choice tasks' few-nat values into
    ``heldout/gold_logprob`` does not let one long solution's tens of nats swamp them (the sum
    stays in ``gold_logprob_sum``)."""

    spec, items = loaded.spec, loaded.items
    check_code_execution([spec.name])  # consent, and isolation or the opt-out of it
    tok = text_tokenizer(tokenizer)
    prompts = [item.requests[0][0] for item in items]
    outputs = generate_greedy(model, tokenizer, None, int(spec.max_new_tokens),
                              batch_size, prompts=prompts)
    logprobs = score_requests(model, tok, [item.requests[0] for item in items],
                              batch_size=max(1, batch_size // 2))
    lengths = [len(encode_pair(tok, *item.requests[0])[1]) for item in items]
    records = []
    for item, prompt, output, logprob, n in zip(items, prompts, outputs, logprobs, lengths):
        completion = _cut(output, spec.until)
        run = run_python(prompt + completion + (item.check or ""))
        records.append({
            "id": item.id, "pred": 0 if run.passed else 1, "gold": 0,
            "correct": int(run.passed), "gold_logprob": round(float(logprob) / n, 6),
            "gold_logprob_sum": round(float(logprob), 6), "tokens": n,
            "output": completion, "timed_out": run.timed_out, "returncode": run.returncode,
            "isolation": list(run.isolation),
        })
    metrics = {f"{spec.name}/pass@1": proportion_metric([r["correct"] for r in records]),
               f"{spec.name}/gold_logprob": mean_metric([r["gold_logprob"] for r in records])}
    return records, metrics


def _cut(text: str, until: Sequence[str]) -> str:
    """The completion up to its first stop string (the rest is not part of the function)."""
    ends = [text.find(stop) for stop in until if stop in text]
    return text[: min(ends)] if ends else text


def _item_scores(model, tokenizer, loaded: LoadedTask, batch_size: int) -> list[float]:
    """Log-likelihood of every request: text items as lm-eval scores them; image items after a
    chat turn holding the item's images and context (the VLM's processor builds the inputs)."""

    items = loaded.items
    if not any(item.images for item in items):
        requests = [r for item in items for r in item.requests]
        return score_requests(model, text_tokenizer(tokenizer), requests, batch_size=batch_size)
    if not is_processor(tokenizer):
        raise ForgetlessError(f"task '{loaded.spec.name}' has images: it needs a "
                              "vision-language model (one loaded with its processor)")
    prompts, continuations, pictures = [], [], []
    for item in items:
        images = [open_image(path) for path in item.images]
        for context, continuation in item.requests:
            prompts.append(render_multimodal(
                tokenizer, image_messages(context, None, len(images)), add_generation_prompt=True))
            continuations.append(continuation.lstrip())  # the answer opens the assistant turn
            pictures.append(images)
    scored = score_processed(model, tokenizer, prompts, continuations, pictures,
                             batch_size=max(1, batch_size // 2))
    return [logprob for logprob, _ in scored]


def _score_target(model, tokenizer, target: Target, limit, seed, batch_size, exclude=()):
    rows = target.load()
    available = len(rows)
    if exclude:  # a disjoint sample: draw from the rows left
        keep = [i for i in range(len(rows)) if i not in set(exclude)]
        if limit is not None and limit < len(keep):
            keep = sorted(np.random.default_rng(seed).choice(keep, limit, replace=False))
        rows = [rows[i] for i in keep]
    elif limit is not None and limit < len(rows):
        chosen = sorted(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
        rows = [rows[i] for i in chosen]
    outputs = generate_greedy(model, tokenizer, rows, target.max_new_tokens, batch_size)
    nll = answer_nll(model, tokenizer, rows, batch_size=max(1, batch_size // 2))
    records = []
    for row, output, (total, count) in zip(rows, outputs, nll):
        pred = target.extract(output)
        records.append({
            "id": row.id, "pred": pred, "gold": row.answer, "correct": int(pred == row.answer),
            "nll": total, "tokens": count, "output": output,
        })
    name = target.name
    totals = [r["nll"] for r in records]
    counts = [r["tokens"] for r in records]
    metrics = {
        f"{name}/exact_match": proportion_metric([r["correct"] for r in records]),
        f"{name}/answer_nll": bootstrap_metric([totals, counts], lambda t, c: t.sum() / c.sum()),
        f"{name}/answer_ppl": bootstrap_metric(
            [totals, counts], lambda t, c: float(np.exp(t.sum() / c.sum()))
        ),
    }
    info = {"name": name, "available": available,
            "n": len(rows), "rows_sha256": _sha([_row_identity(r) for r in rows]),
            "max_new_tokens": target.max_new_tokens}
    return name, records, metrics, info


def _row_identity(row) -> dict:
    """A target row as JSON can hash it: an in-memory image by its pixels, a path as text."""
    data = dict(row.__dict__)
    if data.get("images"):
        data["images"] = [hashlib.sha256(image.tobytes()).hexdigest()
                          if hasattr(image, "tobytes") else str(image)
                          for image in data["images"]]
    else:
        data.pop("images", None)  # text rows hash as they did before images existed
    return data


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _describe(model, name: str | None) -> dict:
    config = getattr(model, "config", None)
    return {
        "name": name or getattr(config, "_name_or_path", None) or type(model).__name__,
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _provenance(model, model_name, base, base_name, seed, limit, num_fewshot) -> dict:
    import transformers

    return {
        "forgetless_version": forgetless.__version__,
        "metrics_version": METRICS_VERSION,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python": platform.python_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": _describe(model, model_name),
        "base": _describe(base, base_name) if base is not None else None,
        "seed": seed,
        "limit": dict(limit) if isinstance(limit, Mapping) else limit,
        "num_fewshot": num_fewshot or 0,
    }
