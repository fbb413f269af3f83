"""How far a tuned model moved from its base: output drift on held-out prompts and per-module
parameter drift.

Output drift is mean per-token KL(base || tuned), top-1 agreement, and the probability mass on
number tokens (digits, ordinals, number words). The last is the probe of arXiv:2510.08564:
after tuning on a counting task a model puts more mass on numbers even on unrelated prompts,
a forgetting symptom that accuracy alone can miss. Parameter drift says *where* it moved.
"""

from __future__ import annotations

import copy
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from forgetless.devices import model_device
from forgetless.errors import ForgetlessError
from forgetless.eval.stats import Metric, mean_metric
from forgetless.vlm.examples import image_messages
from forgetless.vlm.images import open_image
from forgetless.vlm.processors import (
    image_token_id,
    is_processor,
    process,
    render_multimodal,
    text_tokenizer,
)

_NUMBER_WORDS = {
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    "hundred", "thousand", "million", "billion", "trillion", "dozen",
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
    "tenth", "eleventh", "twelfth", "twentieth", "hundredth", "thousandth",
}
_NUMERIC = re.compile(r"^\d+(?:st|nd|rd|th)?$")
_NUMBER_IDS_CACHE: dict[tuple[str, int], list[int]] = {}


def is_number_piece(text: str) -> bool:
    """A token's text is a number: digits, a digit ordinal (``3rd``) or a number word."""
    word = text.strip().lower()
    return bool(word) and (bool(_NUMERIC.match(word)) or word in _NUMBER_WORDS)


def number_token_ids(tokenizer) -> list[int]:
    """Ids of tokens whose decoded text is a number (leading-space variants included)."""
    key = (getattr(tokenizer, "name_or_path", "") or str(id(tokenizer)), len(tokenizer))
    if key not in _NUMBER_IDS_CACHE:
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _NUMBER_IDS_CACHE[key] = [i for i, p in enumerate(pieces) if is_number_piece(p)]
    return _NUMBER_IDS_CACHE[key]


DriftPrompt = str | tuple[str, Sequence[Any]]  # text, or (text, images) for a VLM


def _drift_batches(tokenizer, prompts: Sequence[DriftPrompt], batch_size: int,
                   max_length: int):
    """(model inputs, positions to average) per batch. Text prompts are encoded as they are;
    an image prompt becomes a chat turn with its images, processed by the VLM's processor, and
    its image-token positions are left out of the average (they predict nothing)."""

    text = text_tokenizer(tokenizer)
    pad_id = text.pad_token_id if text.pad_token_id is not None else 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        if all(isinstance(p, str) for p in chunk):
            encoded = [e for e in (text.encode(p)[:max_length] for p in chunk) if e]
            if not encoded:
                continue
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, e in enumerate(encoded):
                ids[r, : len(e)], mask[r, : len(e)] = torch.tensor(e), 1
            yield {"input_ids": ids, "attention_mask": mask}, mask
            continue
        if not is_processor(tokenizer):
            raise ForgetlessError("drift prompts with images need a vision-language model's "
                                  "processor")
        texts, pictures = [], []
        for prompt in chunk:
            words, images = (prompt, ()) if isinstance(prompt, str) else prompt
            texts.append(render_multimodal(tokenizer, image_messages(words, None, len(images)),
                                           add_generation_prompt=True))
            pictures.append([open_image(image) for image in images])
        inputs = dict(process(tokenizer, texts, pictures))
        mask = inputs["attention_mask"].clone()
        token = image_token_id(tokenizer)
        if token is not None:
            mask[inputs["input_ids"] == token] = 0
        yield inputs, mask


def kl_and_number_mass(
    model,
    base,
    tokenizer,
    prompts: Sequence[DriftPrompt],
    batch_size: int = 8,
    max_length: int = 256,
) -> dict[str, Metric]:
    """Next-token drift of ``model`` from ``base`` over every position of every prompt.

    Returns Metrics over prompts (each prompt's mean over its positions): ``kl`` =
    KL(base || tuned) in nats per token, ``top1_agreement``, ``number_mass`` (tuned),
    ``number_mass_base`` and their paired difference ``number_mass_change``. ``tokenizer`` may
    be a VLM's processor, and a prompt a ``(text, images)`` pair (see ``_drift_batches``).
    """

    if not prompts:
        raise ForgetlessError("drift needs at least one prompt")
    device, base_device = model_device(model), model_device(base)
    number_ids = torch.tensor(number_token_ids(text_tokenizer(tokenizer)), dtype=torch.long,
                              device=device)
    per_prompt: dict[str, list[float]] = defaultdict(list)
    states = (model.training, base.training)
    model.eval()
    base.eval()
    try:
        with torch.inference_mode():
            for inputs, mask in _drift_batches(tokenizer, prompts, batch_size, max_length):
                here = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
                there = {k: v.to(base_device) if torch.is_tensor(v) else v
                         for k, v in inputs.items()}
                mask = mask.to(device)
                logits_b = base(**there).logits.to(device)
                log_t = F.log_softmax(model(**here).logits.float(), -1)
                log_b = F.log_softmax(logits_b.float(), -1)
                if log_t.shape[-1] != log_b.shape[-1]:
                    raise ForgetlessError(
                        f"model and base vocabularies differ ({log_t.shape[-1]} vs "
                        f"{log_b.shape[-1]} logits)"
                    )
                kl = (log_b.exp() * (log_b - log_t)).sum(-1)
                agree = (log_b.argmax(-1) == log_t.argmax(-1)).float()
                mass_t = log_t.exp()[..., number_ids].sum(-1)
                mass_b = log_b.exp()[..., number_ids].sum(-1)
                maskf = mask.float()
                n = maskf.sum(-1)
                for key, values in (("kl", kl), ("top1_agreement", agree),
                                    ("number_mass", mass_t), ("number_mass_base", mass_b)):
                    per_prompt[key] += ((values * maskf).sum(-1) / n).tolist()
    finally:
        model.train(states[0])
        base.train(states[1])
    # Paired per prompt, so the change gets its own standard error.
    pairs = zip(per_prompt["number_mass"], per_prompt["number_mass_base"], strict=True)
    per_prompt["number_mass_change"] = [after - before for after, before in pairs]
    return {key: mean_metric(values) for key, values in per_prompt.items()}


@dataclass
class ParamDrift:
    """Per-parameter rows plus aggregates by layer and by module type.

    ``rel_l2`` = ||W - W0|| / ||W0||; ``changed_frac`` = share of coordinates with W != W0.
    Aggregates pool sums of squares and counts, so they weigh parameters by size.
    """

    rows: list[dict]
    by_layer: dict[str, dict]
    by_type: dict[str, dict]
    total: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _merged(model):
    """LoRA adapters only show up in the weights after merging; merge a copy, not the model."""
    if hasattr(model, "peft_config") and hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()
    return model


def _layer_and_type(name: str) -> tuple[str, str]:
    parts = name.split(".")
    module = parts[:-1] if parts[-1] in ("weight", "bias") else parts
    for i, part in enumerate(module):
        if part.isdigit():
            return part, ".".join(module[i + 1 :]) or module[-1]
    return "other", module[-1] if module else name


def param_drift(model, base) -> ParamDrift:
    """Relative L2 change and share of changed coordinates per parameter, layer and type.

    Each pair is compared where the model's parameter lives (the base's copy moves there), and
    one row of sums crosses to the host per parameter."""
    tuned = dict(_merged(model).named_parameters())
    reference = dict(_merged(base).named_parameters())
    names = [n for n in tuned if n in reference]
    if not names:
        raise ForgetlessError("model and base share no parameter names: not the same architecture")
    rows = []
    with torch.no_grad():
        for name in names:
            w = tuned[name].detach()
            w0 = reference[name].detach().to(w.device).float()
            w = w.float()
            if w.shape != w0.shape:
                raise ForgetlessError(
                    f"parameter {name} has shape {tuple(w.shape)} in the model but "
                    f"{tuple(w0.shape)} in the base"
                )
            layer, module_type = _layer_and_type(name)
            sums = torch.stack([(w - w0).pow(2).sum().double(), w0.pow(2).sum().double(),
                                (w != w0).sum().double()]).tolist()
            rows.append({
                "name": name, "layer": layer, "type": module_type, "numel": w.numel(),
                "diff_sq": sums[0], "base_sq": sums[1], "changed": int(sums[2]),
            })
    by_layer, by_type = _aggregate(rows, "layer"), _aggregate(rows, "type")
    total = _aggregate(rows, None)["all"]
    for row in rows:
        row.update(_summary(row["diff_sq"], row["base_sq"], row["changed"], row["numel"]))
    return ParamDrift(rows, by_layer, by_type, total)


def _summary(diff_sq: float, base_sq: float, changed: int, numel: int) -> dict:
    rel = math.sqrt(diff_sq / base_sq) if base_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    return {"rel_l2": rel, "changed_frac": changed / numel if numel else 0.0}


def _aggregate(rows: list[dict], key: str | None) -> dict[str, dict]:
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0, 0])
    for row in rows:
        s = sums[row[key] if key else "all"]
        s[0] += row["diff_sq"]
        s[1] += row["base_sq"]
        s[2] += row["changed"]
        s[3] += row["numel"]
    return {
        k: {"numel": int(s[3]), **_summary(s[0], s[1], int(s[2]), int(s[3]))}
        for k, s in sums.items()
    }
