"""Batched log-likelihood of continuations, the one scorer behind every multiple-choice task.

Tokenisation mirrors lm-eval-harness (``_encode_pair``: trailing context spaces move into the
continuation; the continuation is the tail of the whole string's encoding) so per-item choices
agree with it. Speed comes from computing each distinct context once: its prefix goes through
the model a single time, then its KV cache is copied to every choice, so a 4-choice question
costs one context plus four short continuations instead of four full sequences. Tokens that
all choices start with (PIQA's solutions often share a long opening) count as context too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from forgetless.errors import ForgetlessError


def check_model_tokenizer(model, tokenizer) -> None:
    """Refuse a tokenizer whose ids the model cannot embed (a mismatched pair scores garbage)."""
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


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    return ids, mask


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


def _forward(model, keep: int | None = None, **inputs):
    """Forward pass computing vocab logits only for the last ``keep`` positions if supported."""
    if keep is None:
        return model(**inputs).logits, None
    try:
        out = model(**inputs, logits_to_keep=keep)
    except TypeError:  # architectures without logits_to_keep
        out = model(**inputs)
    return out.logits[:, -keep:], out.past_key_values


def _score_batch_shared(model, batch: list[_Group], pad_id: int) -> list[list[float]]:
    """One pass over each context plus the choices' common opening tokens, then one pass over
    the rest of every choice, reusing that context's KV cache."""
    shared = [_shared_prefix(g.continuations) for g in batch]
    prefixes = [(g.context + g.continuations[0][:s])[:-1] for g, s in zip(batch, shared)]
    if min(len(p) for p in prefixes) == 0:  # a 1-token context: nothing to cache
        return _score_batch_full(model, batch, pad_id)
    pre_ids, pre_mask = _pad(prefixes, pad_id, left=True)
    keep = max(max(shared), 1)
    logits, cache = _forward(
        model, keep, input_ids=pre_ids, attention_mask=pre_mask,
        position_ids=(pre_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
    )
    shared_lp = []
    for g, (group, s) in enumerate(zip(batch, shared)):
        target = torch.tensor(group.continuations[0][:s], dtype=torch.long)
        shared_lp.append(float(_token_logprobs(logits[g, keep - s :], target).sum()) if s else 0.0)
    rows, targets, owners = [], [], []
    for g, (group, s) in enumerate(zip(batch, shared)):
        last = (group.context + group.continuations[0][:s])[-1]
        for cont in group.continuations:
            rows.append([last, *cont[s:-1]])
            targets.append(cont[s:])
            owners.append(g)
    owner_idx = torch.tensor(owners)
    cont_ids, cont_mask = _pad(rows, pad_id, left=False)
    target_ids, _ = _pad(targets, pad_id, left=False)
    cache.reorder_cache(owner_idx)
    lengths = pre_mask.sum(-1)[owner_idx]
    logits, _ = _forward(
        model,
        input_ids=cont_ids,
        attention_mask=torch.cat([pre_mask[owner_idx], cont_mask], dim=-1),
        position_ids=lengths.unsqueeze(-1) + torch.arange(cont_ids.shape[1]).unsqueeze(0),
        past_key_values=cache,
        use_cache=True,
    )
    totals = (_token_logprobs(logits, target_ids) * cont_mask).sum(-1).tolist()
    scores: list[list[float]] = [[] for _ in batch]
    for g, total in zip(owners, totals):
        scores[g].append(total + shared_lp[g])
    return scores


def _score_batch_full(model, batch: list[_Group], pad_id: int) -> list[list[float]]:
    """Reference path: every (context + continuation) as its own right-padded sequence."""
    wholes, owners = [], []
    for gi, g in enumerate(batch):
        for cont in g.continuations:
            wholes.append((g.context + cont, len(g.context)))
            owners.append(gi)
    ids, mask = _pad([w[:-1] for w, _ in wholes], pad_id, left=False)
    logits = model(input_ids=ids, attention_mask=mask).logits
    scores: list[list[float]] = [[] for _ in batch]
    for r, ((whole, n_context), gi) in enumerate(zip(wholes, owners)):
        target = torch.tensor(whole[n_context:])
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
    max_tokens: int = 4096,
    share_context: bool = True,
) -> list[float]:
    """Sum of log p(continuation ids | context ids) for each pair of token-id lists.

    ``batch_size`` caps distinct contexts per forward pass and ``max_tokens`` the padded size of
    the choice pass (it bounds the vocab-sized logits in memory). Contexts are sorted by length
    so batches pad little. ``share_context=False`` scores each pair as its own sequence (the
    slow reference the shared path is tested against).
    """
    groups = _groups(pairs)
    def length(g: _Group) -> int:
        return len(g.context) + max(len(c) for c in g.continuations)

    order = sorted(range(len(groups)), key=lambda i: -length(groups[i]))
    results: list[float] = [0.0] * len(pairs)
    score = _score_batch_shared if share_context else _score_batch_full
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in _batches([groups[i] for i in order], batch_size, max_tokens):
                for group, totals in zip(batch, score(model, batch, pad_id)):
                    for request_id, total in zip(group.request_ids, totals):
                        results[request_id] = total
    finally:
        model.train(was_training)
    return results


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
