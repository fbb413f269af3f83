"""Batched log-likelihood of continuations, the one scorer behind every multiple-choice task.

Tokenisation mirrors lm-eval-harness (``_encode_pair``: trailing context spaces move into the
continuation; the continuation is the tail of the whole string's encoding) so per-item choices
agree with it. Speed comes from computing each distinct context once: its prefix goes through
the model a single time, then its KV cache is copied to every choice, so a 4-choice question
costs one context plus four short continuations instead of four full sequences. Tokens that
all choices start with (PIQA's solutions often share a long opening) count as context too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from forgetless.devices import model_device
from forgetless.errors import ForgetlessError
from forgetless.vlm.processors import process, text_tokenizer


def check_model_tokenizer(model, tokenizer) -> None:
    """Refuse a tokenizer whose ids the model cannot embed (a mismatched pair scores garbage)."""

    tokenizer = text_tokenizer(tokenizer)
    embeddings = model.get_input_embeddings()
    size = getattr(embeddings, "num_embeddings", None)
    if size is not None and len(tokenizer) > size:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ForgetlessError(
            f"tokenizer '{name}' has {len(tokenizer)} tokens but the model embeds only {size}: "
            "model and tokenizer do not match"
        )


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's ``HFLM`` builds them."""
    if not context:
        prefix = tokenizer.bos_token_id
        prefix = tokenizer.eos_token_id if prefix is None else prefix
        return [prefix], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


@dataclass
class _Group:
    """All requests sharing one context: scored from one pass over that context."""

    context: list[int]
    continuations: list[list[int]]
    request_ids: list[int]


def _groups(pairs: Sequence[tuple[list[int], list[int]]]) -> list[_Group]:
    groups: dict[tuple[int, ...], _Group] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ForgetlessError("cannot score an empty context or continuation")
        group = groups.setdefault(tuple(ctx), _Group(list(ctx), [], []))
        group.continuations.append(list(cont))
        group.request_ids.append(i)
    return list(groups.values())


def _pad(rows: list[list[int]], pad_id: int, left: bool,
         device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids and attention mask, built on the host and moved to ``device`` in one copy."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position without materialising a second vocab-sized tensor."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _shared_prefix(continuations: list[list[int]]) -> int:
    """Tokens all choices start with (each keeps at least one token of its own)."""
    limit = min(len(c) for c in continuations) - 1
    n = 0
    while n < limit and all(c[n] == continuations[0][n] for c in continuations):
        n += 1
    return n if len(continuations) > 1 else 0


@functools.cache
def _cache_name() -> str:
    """The KV cache's keyword and output field: ``cache`` from transformers 5.2x, where
    ``past_key_values`` warns that it is deprecated; ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _forward(model, keep: int | None = None, **inputs):
    """Forward pass computing vocab logits only for the last ``keep`` positions if supported."""
    if keep is None:
        return model(**inputs).logits, None
    try:
        out = model(**inputs, logits_to_keep=keep)
    except TypeError:  # architectures without logits_to_keep
        out = model(**inputs)
    return out.logits[:, -keep:], getattr(out, _cache_name())


def _score_window_shared(
    model, groups: list[_Group], pad_id: int, batch_size: int, max_tokens: int,
    device: torch.device | None = None,
) -> list[list[float]]:
    """Score a window of groups in two phases, each sorted by its own length so little padding
    is computed: (1) contexts plus the choices' common opening tokens, keeping each one's KV
    cache; (2) the rest of every choice, its context's cache left-padded into the batch."""
    from transformers import DynamicCache

    device = device or model_device(model)
    shared = [_shared_prefix(g.continuations) for g in groups]
    prefixes = [(g.context + g.continuations[0][:s])[:-1] for g, s in zip(groups, shared)]
    if min(len(p) for p in prefixes) == 0:  # 1-token contexts have nothing to cache
        out: list[list[float]] = [[] for _ in groups]
        for keep_cache in (False, True):
            index = [g for g, p in enumerate(prefixes) if bool(p) == keep_cache]
            part = [groups[g] for g in index]
            if not part:
                continue
            if keep_cache:
                part_scores = _score_window_shared(model, part, pad_id, batch_size, max_tokens,
                                                   device)
            else:
                part_scores = [t for b in _batches(part, batch_size, max_tokens)
                               for t in _score_batch_full(model, b, pad_id, device)]
            for g, totals in zip(index, part_scores):
                out[g] = totals
        return out
    kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in groups]
    scores: list[list[float]] = [[] for _ in groups]
    shared_lp = [0.0] * len(groups)
    by_prefix = sorted(range(len(groups)), key=lambda g: -len(prefixes[g]))
    lengths_1 = [len(prefixes[g]) for g in by_prefix]
    for lo, hi in _spans(lengths_1, batch_size, max_tokens):
        batch = by_prefix[lo:hi]
        pre_ids, pre_mask = _pad([prefixes[g] for g in batch], pad_id, left=True, device=device)
        keep = max(max(shared[g] for g in batch), 1)
        logits, cache = _forward(
            model, keep, input_ids=pre_ids, attention_mask=pre_mask,
            position_ids=(pre_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
        )
        for r, g in enumerate(batch):
            n, s = len(prefixes[g]), shared[g]
            kv[g] = [(layer.keys[r, :, -n:], layer.values[r, :, -n:]) for layer in cache.layers]
            if s:
                target = torch.tensor(groups[g].continuations[0][:s], device=device)
                shared_lp[g] = float(_token_logprobs(logits[r, keep - s :], target).sum())
    rows = []  # (group, choice, input ids, target ids)
    for g, (group, s) in enumerate(zip(groups, shared)):
        last = (group.context + group.continuations[0][:s])[-1]
        for j, cont in enumerate(group.continuations):
            rows.append((g, j, [last, *cont[s:-1]], cont[s:]))
            scores[g].append(0.0)
    rows.sort(key=lambda row: -len(row[2]))
    for lo, hi in _spans([len(row[2]) for row in rows], len(rows), max_tokens):
        batch_rows = rows[lo:hi]
        owners = [row[0] for row in batch_rows]
        cont_ids, cont_mask = _pad([row[2] for row in batch_rows], pad_id, False, device)
        target_ids, _ = _pad([row[3] for row in batch_rows], pad_id, False, device)
        width_p = max(len(prefixes[g]) for g in owners)
        lengths = torch.tensor([len(prefixes[g]) for g in owners], device=device)
        positions = torch.arange(width_p, device=device).unsqueeze(0)
        pre_mask = (positions >= width_p - lengths.unsqueeze(-1)).long()
        kv_cache = DynamicCache()
        for layer in range(len(kv[owners[0]])):
            k0, v0 = kv[owners[0]][layer]
            keys = k0.new_zeros((len(owners), k0.shape[0], width_p, k0.shape[-1]))
            values = v0.new_zeros((len(owners), v0.shape[0], width_p, v0.shape[-1]))
            for r, g in enumerate(owners):
                k, v = kv[g][layer]
                keys[r, :, width_p - k.shape[1] :], values[r, :, width_p - v.shape[1] :] = k, v
            kv_cache.update(keys, values, layer)
        logits, _ = _forward(
            model,
            input_ids=cont_ids,
            attention_mask=torch.cat([pre_mask, cont_mask], dim=-1),
            position_ids=lengths.unsqueeze(-1)
            + torch.arange(cont_ids.shape[1], device=device).unsqueeze(0),
            **{_cache_name(): kv_cache},
            use_cache=True,
        )
        totals = (_token_logprobs(logits, target_ids) * cont_mask).sum(-1).tolist()
        for (g, j, _, _), total in zip(batch_rows, totals):
            scores[g][j] = total + shared_lp[g]
    return scores


def _score_batch_full(model, batch: list[_Group], pad_id: int,
                      device: torch.device | None = None) -> list[list[float]]:
    """Reference path: every (context + continuation) as its own right-padded sequence."""
    device = device or model_device(model)
    wholes, owners = [], []
    for gi, g in enumerate(batch):
        for cont in g.continuations:
            wholes.append((g.context + cont, len(g.context)))
            owners.append(gi)
    ids, mask = _pad([w[:-1] for w, _ in wholes], pad_id, left=False, device=device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    scores: list[list[float]] = [[] for _ in batch]
    for r, ((whole, n_context), gi) in enumerate(zip(wholes, owners)):
        target = torch.tensor(whole[n_context:], device=device)
        lp = _token_logprobs(logits[r, n_context - 1 : len(whole) - 1], target)
        scores[gi].append(float(lp.sum()))
    return scores


def score_requests(
    model, tokenizer, requests: Sequence[tuple[str, str]], **kwargs
) -> list[float]:
    """Sum of log p(continuation | context) for each (context, continuation) string pair."""
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    for (_, cont), (_, text) in zip(pairs, requests):
        if not cont:
            raise ForgetlessError(f"continuation {text!r} tokenises to nothing")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return score_token_pairs(model, pairs, pad_id=pad_id, **kwargs)


def score_token_pairs(
    model,
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int = 0,
    batch_size: int = 16,
    max_tokens: int = 2048,
    share_context: bool = True,
    window_tokens: int = 8192,
) -> list[float]:
    """Sum of log p(continuation ids | context ids) for each pair of token-id lists.

    ``batch_size`` caps contexts per forward pass; ``max_tokens`` caps a pass's padded size
    (bounding its vocab-sized logits in memory). Contexts are processed in windows of about
    ``window_tokens`` context tokens, whose KV caches stay in memory until their choices are
    scored (~46 KB per token for SmolLM2-135M); each phase sorts its window by length.
    ``share_context=False`` scores each pair as its own sequence (the slow reference the shared
    path is tested against).
    """
    groups = _groups(pairs)

    def length(g: _Group) -> int:
        return len(g.context) + max(len(c) for c in g.continuations)

    order = sorted(range(len(groups)), key=lambda i: -length(groups[i]))
    ordered = [groups[i] for i in order]
    if share_context:  # windows of many batches, bounded by the KV caches they keep alive
        chunks, tokens = [[]], 0
        for g in ordered:
            if chunks[-1] and tokens + len(g.context) > window_tokens:
                chunks.append([])
                tokens = 0
            chunks[-1].append(g)
            tokens += len(g.context)
    else:
        chunks = list(_batches(ordered, batch_size, max_tokens))
    results: list[float] = [0.0] * len(pairs)
    device = model_device(model)  # inputs go where the model is; the model never moves
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for chunk in chunks:
                if share_context:
                    chunk_scores = _score_window_shared(
                        model, chunk, pad_id, batch_size, max_tokens, device
                    )
                else:
                    chunk_scores = _score_batch_full(model, chunk, pad_id, device)
                for group, totals in zip(chunk, chunk_scores):
                    for request_id, total in zip(group.request_ids, totals):
                        results[request_id] = total
    finally:
        model.train(was_training)
    return results


def _spans(lengths: list[int], max_rows: int, max_tokens: int, slack: float = 0.05):
    """Cut lengths sorted longest first into (start, end) batches that stay within
    ``max_rows`` rows and ``max_tokens`` padded tokens and waste at most ``slack`` on padding
    (on a CPU, padded tokens cost as much as real ones)."""
    start = 0
    while start < len(lengths):
        width, end, real = lengths[start], start + 1, lengths[start]
        while end < len(lengths) and end - start < max_rows:
            padded = (end + 1 - start) * width
            if padded > max_tokens or padded - (real + lengths[end]) > slack * padded:
                break
            real += lengths[end]
            end += 1
        yield start, end
        start = end


def _batches(groups: list[_Group], batch_size: int, max_tokens: int):
    batch: list[_Group] = []
    rows = width = 0
    for g in groups:
        g_width = max(len(c) for c in g.continuations)
        new_rows, new_width = rows + len(g.continuations), max(width, g_width)
        if batch and (len(batch) >= batch_size or new_rows * new_width > max_tokens):
            yield batch
            batch, new_rows, new_width = [], len(g.continuations), g_width
        batch.append(g)
        rows, width = new_rows, new_width
    if batch:
        yield batch


def score_processed(
    model, processor, prompts: Sequence[str], continuations: Sequence[str],
    images: Sequence[Sequence], batch_size: int = 8,
) -> list[tuple[float, int]]:
    """(sum log p(continuation | prompt, images), continuation tokens) per row, for a VLM.

    ``prompts`` are chat-rendered texts holding the processor's image placeholders; the
    processor expands them, so a prompt's length is measured after processing (prompt alone,
    then prompt + continuation; the one-pass KV sharing of ``score_token_pairs`` would have to
    repeat the image features, and image tasks are small).
    """

    device = model_device(model)
    out: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                span = slice(start, start + batch_size)
                pictures = [list(group) for group in images[span]]
                heads = process(processor, list(prompts[span]), pictures)
                wholes = process(processor, [p + c for p, c in
                                             zip(prompts[span], continuations[span])], pictures)
                starts = heads["attention_mask"].sum(-1).tolist()
                ends = wholes["attention_mask"].sum(-1).tolist()
                inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in wholes.items()}
                logits = model(**inputs).logits
                for row, (first, last) in enumerate(zip(starts, ends)):
                    if last <= first:
                        raise ForgetlessError(
                            f"continuation {continuations[start + row]!r} tokenises to nothing")
                    target = inputs["input_ids"][row, first:last]
                    lp = _token_logprobs(logits[row, first - 1 : last - 1], target)
                    out.append((float(lp.sum()), last - first))
    finally:
        model.train(was_training)
    return out
