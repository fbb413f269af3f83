"""Elastic weight consolidation (Kirkpatrick et al. 2017) against the pre-trained weights.

penalty = (λ / 2) · Σ_i (F_i / F̄) · (θ_i − θ₀_i)²  over the trainable parameters,

with F the diagonal empirical Fisher of the base, estimated once before training on general
examples: F_i = (1/n) Σ_k (∂ℓ_k/∂θ_i)², ℓ_k the mean token negative log-likelihood of example
k's response (one example per backward pass: the per-example gradient, not a batch mean, whose
square would be a different and much smaller quantity). F̄ is F's mean over all trainable
coordinates: dividing by it makes λ independent of the loss's and the model's scale, so
``ewc_lambda`` reads like ``l2-anchor``'s weight (a flat Fisher gives λ/2 · Σ‖θ−θ₀‖²) while the
pull concentrates on the weights the general examples need.

Memory: θ₀ and F, two more copies of the trainable parameters (``forgetless plan`` counts
them). The penalty runs as one autograd node whose forward sums in chunks and whose backward
writes each gradient λ/F̄ · F ⊙ (θ − θ₀) directly: no parameter-sized temporaries beyond the
gradient itself (autograd of the explicit formula would keep θ − θ₀ and its products).

Where the general examples come from is a *source*: a built-in dataset name or a file (read
by ``forgetless.data``), or a name registered with ``register_fisher_source`` (the hook for
``self``, the base model's own rehearsal), or any list of conversations handed to
``estimate_fisher_from_conversations``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forgetless.data import (
    IGNORE_INDEX,
    Example,
    data_collator,
    load_examples,
    tokenize_conversation,
)
from forgetless.errors import ForgetlessError
from forgetless.mixing import default_exclude, heldout_texts
from forgetless.models import is_processor
from forgetless.paths import cache_dir
from forgetless.rehearsal import rehearse

# Elements per chunk when the penalty sums (bounds the forward's temporaries to 16 MiB fp32).
CHUNK = 1 << 22
FISHER_FILE = "ewc_fisher.safetensors"

# name -> fn(model, tokenizer, n, seed) returning conversations (lists of chat messages) or
# data.Example; see register_fisher_source.
_SOURCES: dict[str, Callable[..., list[Any]]] = {}


def register_fisher_source(name: str, fn: Callable[..., list[Any]]) -> None:
    """Make ``ewc_source=<name>`` call ``fn(model, tokenizer, n, seed)`` for its examples
    (conversations or ``data.Example``), e.g. ``self``: the base model's own answers."""
    _SOURCES[name] = fn


def _self_rehearsal(model: nn.Module, tokenizer: Any, n: int, seed: int) -> list[Any]:
    """``ewc_source=self``: the base model's own answers to instructions it wrote itself
    (``forgetless.rehearsal``, Magpie-style), held-out overlaps excluded as for ``mix:``; cached,
    so a ``mix: [{source: self}]`` of the same n and seed shares the rows."""
    record = rehearse(model, tokenizer, n=n, seed=seed, cache=cache_dir(),
                      excluded=heldout_texts(default_exclude()))
    return record["conversations"]


_SOURCES["self"] = _self_rehearsal


def fisher_sources() -> list[str]:
    return list(_SOURCES)


def check_fisher_source(source: str) -> None:
    """A source that cannot be read fails here, before any model loads."""
    if source in _SOURCES:
        return
    load_examples(source, "train")


class _Penalty(torch.autograd.Function):
    """Σ F(θ−θ₀)² · scale/2 as one node; backward gives scale · F ⊙ (θ−θ₀) per parameter."""

    @staticmethod
    def forward(ctx, ewc: EWCPenalty, *params: torch.Tensor) -> torch.Tensor:
        ctx.ewc = ewc
        total = torch.zeros((), dtype=torch.float32, device=params[0].device)
        for param, anchor, fisher in zip(params, ewc.anchors, ewc.fisher, strict=True):
            flat, flat0, flatf = param.reshape(-1), anchor.reshape(-1), fisher.reshape(-1)
            for start in range(0, flat.numel(), CHUNK):
                end = start + CHUNK
                diff = flat[start:end].float() - flat0[start:end].float()
                total += diff.square_().mul_(flatf[start:end]).sum()
        return total * (ewc.scale / 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ewc = ctx.ewc
        factor = grad * ewc.scale
        grads = []
        for param, anchor, fisher in zip(ewc.params, ewc.anchors, ewc.fisher, strict=True):
            out = torch.sub(param.detach(), anchor)  # the one tensor: it becomes the gradient
            out.mul_(fisher).mul_(factor.to(out.dtype))
            grads.append(out)
        return (None, *grads)


class EWCPenalty:
    """Callable regulariser ``ewc(model) -> scalar``: the EWC penalty (module docstring).

    It holds the trained parameters themselves (as ``AnchorPenalty`` does), θ₀ and F in the
    parameters' dtype and device. F starts at zero (no pull) until ``estimate`` or ``load``.
    """

    name = "ewc"

    def __init__(self, params: list[nn.Parameter], names: list[str], weight: float) -> None:
        if weight < 0:
            raise ValueError(f"ewc lambda must be >= 0, not {weight}")
        self.params = params
        self.names = names
        self.weight = weight
        self.anchors = [p.detach().clone() for p in params]
        self.fisher = [torch.zeros_like(p, requires_grad=False) for p in params]
        self.fisher_mean = 0.0
        self.info: dict[str, Any] = {}  # how F was made: source, samples, seconds, ...

    @property
    def scale(self) -> float:
        """λ / F̄ (0 before a Fisher is set: no pull)."""
        return self.weight / self.fisher_mean if self.fisher_mean > 0 else 0.0

    @property
    def state_bytes(self) -> int:
        """θ₀ and F (what ``forgetless plan`` counts)."""
        return sum(t.numel() * t.element_size() for t in [*self.anchors, *self.fisher])

    def _follow(self) -> None:
        for i, param in enumerate(self.params):
            if self.anchors[i].device != param.device or self.anchors[i].dtype != param.dtype:
                self.anchors[i] = self.anchors[i].to(param.device, param.dtype)
            if self.fisher[i].device != param.device or self.fisher[i].dtype != param.dtype:
                self.fisher[i] = self.fisher[i].to(param.device, param.dtype)

    def set_fisher(self, fisher: list[torch.Tensor], info: dict | None = None) -> None:
        """Take F (one tensor per parameter, in order) and its mean over every coordinate."""
        if len(fisher) != len(self.params):
            raise ValueError(f"{len(fisher)} Fisher tensors for {len(self.params)} parameters")
        total, count = 0.0, 0
        for i, (param, value) in enumerate(zip(self.params, fisher, strict=True)):
            if value.shape != param.shape:
                raise ValueError(f"Fisher of {self.names[i]}: shape {tuple(value.shape)}, "
                                 f"parameter {tuple(param.shape)}")
            total += float(value.double().sum())
            count += value.numel()
            self.fisher[i] = value.detach().to(param.device, param.dtype)
        self.fisher_mean = total / count if count else 0.0
        self.info = dict(info or {}, fisher_mean=self.fisher_mean)

    def __call__(self, model: nn.Module | None = None) -> torch.Tensor:
        if not self.params:
            return torch.zeros(())
        self._follow()
        return _Penalty.apply(self, *self.params)

    # --- persistence: the Fisher survives a resume ----------------------------------------

    def save(self, path: str | Path, meta: dict) -> None:
        """Write F (float32) and ``meta`` atomically: a kill leaves the old file or none."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: f.detach().float().cpu().contiguous()
                   for name, f in zip(self.names, self.fisher, strict=True)}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={
                "forgetless_ewc": json.dumps(meta, sort_keys=True),
                "forgetless_ewc_info": json.dumps(self.info, sort_keys=True, default=str)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, path: str | Path, meta: dict) -> bool:
        """Take F from ``path`` if it was made with the same ``meta`` for these parameters;
        ``False`` (and nothing changes) otherwise."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored = handle.metadata() or {}
                saved = json.loads(stored.get("forgetless_ewc", "null"))
                info = json.loads(stored.get("forgetless_ewc_info", "{}"))
                if saved != json.loads(json.dumps(meta, sort_keys=True)):
                    return False
                if set(handle.keys()) != set(self.names):
                    return False
                fisher = [handle.get_tensor(name) for name in self.names]
        except (OSError, ValueError, RuntimeError, json.JSONDecodeError):
            return False
        self.set_fisher(fisher, {**info, **meta, "loaded": True})
        return True

    def summary(self) -> dict:
        return {"lambda": self.weight, "state_bytes": self.state_bytes, **self.info}

    def __repr__(self) -> str:
        return f"EWC(lambda={self.weight}, tensors={len(self.params)})"


# --- estimating the Fisher ------------------------------------------------------------------


def estimate_fisher(model: nn.Module, params: list[nn.Parameter], batches: list[dict],
                    autocast_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Diagonal empirical Fisher: the mean over ``batches`` (one example each) of the squared
    gradient of the example's loss (the model's mean token NLL over its labels), in float32.

    The model runs in eval mode (no dropout) and gets its mode back; gradients come from
    ``torch.autograd.grad``, so no ``.grad`` is touched.
    """
    if not batches:
        raise ForgetlessError("ewc: no examples to estimate the Fisher from")
    device = params[0].device
    fisher = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast(device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                loss = model(**batch).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for total, grad in zip(fisher, grads, strict=True):
                if grad is not None:
                    total.add_(grad.float().square())
    finally:
        model.train(was_training)
    for total in fisher:
        total.div_(len(batches))
    return fisher


def fisher_batches(tokenizer: Any, examples: list[Any], max_length: int) -> list[dict]:
    """One collated batch per example (conversations or ``data.Example``), through the same
    tokenisation and collator as training; examples with no response token are dropped."""

    examples = [e if isinstance(e, Example) else Example(e) for e in examples]
    collate = data_collator(tokenizer, max_length)
    if is_processor(tokenizer):
        return [collate([example]) for example in examples]
    out = []
    for example in examples:
        if example.images:
            raise ForgetlessError("ewc: rows with images need a vision-language model")
        row = tokenize_conversation(tokenizer, example.messages, max_length)
        if any(label != IGNORE_INDEX for label in row["labels"]):
            out.append(collate([row]))
    return out


def fisher_examples(model: nn.Module, tokenizer: Any, source: str, n: int,
                    seed: int) -> list[Any]:
    """``n`` examples of ``source``: a registered source (``self``) or a dataset / file, the
    latter shuffled by ``seed`` as training data is."""
    import random

    if source in _SOURCES:
        return list(_SOURCES[source](model, tokenizer, n, seed))[:n]
    check_fisher_source(source)

    examples = load_examples(source, "train")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:n]]


def estimate_fisher_from_conversations(ewc: EWCPenalty, model: nn.Module, tokenizer: Any,
                                       examples: list[Any], max_length: int,
                                       autocast_dtype: torch.dtype | None = None,
                                       info: dict | None = None) -> None:
    """The hook for any example list (e.g. self-rehearsal rows): estimate F on ``examples``
    and set it on ``ewc``."""
    started = time.perf_counter()
    batches = fisher_batches(tokenizer, examples, max_length)
    fisher = estimate_fisher(model, ewc.params, batches, autocast_dtype)
    ewc.set_fisher(fisher, {**(info or {}), "examples_used": len(batches),
                            "seconds": round(time.perf_counter() - started, 3)})


def fit_fisher(ewc: EWCPenalty, model: nn.Module, tokenizer: Any, *, source: str, samples: int,
               seed: int, max_length: int, model_name: str, folder: str | Path | None,
               resume: bool = False, autocast_dtype: torch.dtype | None = None,
               write: bool = True) -> None:
    """Give ``ewc`` its Fisher before training: on ``resume``, the one saved in ``folder`` by
    the interrupted run (if it was made the same way), else estimated on ``samples`` examples
    of ``source`` and saved there (atomically), so a resumed run pulls with the same F."""
    meta = {"source": source, "samples": samples, "seed": seed, "max_length": max_length,
            "model": model_name}
    path = Path(folder) / FISHER_FILE if folder is not None else None
    if resume and path is not None and ewc.load(path, meta):
        print(f"[forgetless] ewc: the Fisher saved by the interrupted run ({path.name})",
              flush=True)
        return
    examples = fisher_examples(model, tokenizer, source, samples, seed)
    estimate_fisher_from_conversations(ewc, model, tokenizer, examples, max_length,
                                       autocast_dtype, meta)
    print(f"[forgetless] ewc: Fisher of the base from {ewc.info['examples_used']} examples of "
          f"{source} in {ewc.info['seconds']:.1f} s", flush=True)
    if write and path is not None:
        ewc.save(path, meta)
