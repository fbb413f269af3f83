"""``UpdateAnalytics``: where and how much the weights move while a run trains.

Methods differ in *which* coordinates they let move (MoFO: a top-k share per step; LoRA and
module presets: some tensors only; full: everything), and that is the mechanism behind how much
they forget. Every ``every`` optimizer steps (and at the first and the last) this callback logs,
per module type (q, k, v, o, gate, up, down, embed, norm, lm_head, ...; ``.lora`` for adapters),
per layer and in total, over the trainable tensors:

* ``moved``: share of coordinates that changed in this optimizer step (a snapshot taken just
  before the step is compared with the weights just after it: exact for every optimizer,
  MoFO's masked step included, and ~100% for AdamW on a trained tensor);
* ``moved_ever``: share of coordinates that ever differed from θ₀ at a measured step (a bool
  mask per trainable tensor; a coordinate that leaves θ₀ and returns exactly between two
  measurements is missed);
* ``rms``: root mean square of this step's update;
* ``drift``: ‖θ − θ₀‖ / ‖θ₀‖ (0 for a group whose θ₀ is all zeros, e.g. LoRA's B alone).

Values go through ``Trainer.log`` (TensorBoard, MLflow see them live) as
``updates/<measure>/<total|type/<t>|layer/<l>>``; ``summary()`` (in ``metrics.json``) keeps the
history of totals and the last per-type values for compare's coverage plot.

Memory: tracking every coordinate costs a copy of the trainable weights (θ₀), a bool per
coordinate and a transient pre-step copy, 9 bytes per float32 trainable parameter — 63 GB on
a 7B full fine-tune. So by default a tensor above twice ``sample`` (65,536) coordinates is
tracked on ``sample`` of them drawn at random once (seeded by the tensor's position, so a
resumed run draws the same); each tensor's sums are scaled up by ``numel / sample`` before the
groups are added. Shares are then unbiased estimates whatever the update's pattern (a strided
subset was tried first and aliased with strided updates: 0.12 measured for a true 0.10), with
a standard error of at most 0.2 points per tensor and less in the totals; smaller tensors,
and ``sample=None``, stay exact. ``analytics_bytes`` says what either costs (``forgetless
plan`` counts it). Cost in time: docs/performance.md (``bench/update_analytics.py``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import TrainerCallback

from forgetless.config import UPDATE_STATS_SAMPLE as DEFAULT_SAMPLE
from forgetless.errors import ForgetlessError
from forgetless.monitor import log_values

MEASURES = ("moved", "moved_ever", "rms", "drift")
# (substring of the parameter name, short module type), first match wins
_TYPES = (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"),
          ("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"),
          ("embed", "embed"), ("lm_head", "lm_head"), ("norm", "norm"))


def module_type(name: str) -> str:
    """Short module type of a parameter name: ``q`` ... ``lm_head``, ``other``; LoRA adapter
    weights get ``.lora`` (``q.lora``), so they are not mixed with frozen base weights."""
    kind = next((short for key, short in _TYPES if key in name), "other")
    return f"{kind}.lora" if "lora_" in name else kind


def layer_of(name: str) -> str:
    """The decoder layer index in a parameter name, or ``other`` (embeddings, final norm)."""
    return next((part for part in name.split(".") if part.isdigit()), "other")


def tracked_indices(numel: int, sample: int | None, seed: int,
                    device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The coordinates a tensor of ``numel`` is tracked on: ``None`` (all of them) when it has
    at most twice ``sample`` (then exact tracking costs no more than a sample and its int64
    indices); else ``sample`` random ones (with replacement, sorted for locality), the same for
    the same ``seed``."""
    if not is_sampled(numel, sample):
        return None
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(numel, (sample,), generator=generator).sort().values
    return index.to(device)


def is_sampled(numel: int, sample: int | None) -> bool:
    """Whether a tensor of ``numel`` coordinates is tracked on a sample (see
    ``tracked_indices``)."""
    return sample is not None and numel > 2 * sample


def analytics_bytes(params: list[torch.Tensor], sample: int | None = DEFAULT_SAMPLE) -> int:
    """Bytes ``UpdateAnalytics(sample=sample)`` holds for ``params`` (meta tensors do): θ₀ of
    the tracked coordinates, the pre-step snapshot at a measured step (both in the parameter's
    dtype), a bool per tracked coordinate and, for a sampled tensor, its int64 indices.
    ``forgetless plan`` adds it to each method."""
    total = 0
    for param in params:
        sampled = is_sampled(param.numel(), sample)
        tracked = sample if sampled else param.numel()
        total += tracked * (2 * param.element_size() + 1 + (8 if sampled else 0))
    return total


def _tracked(param: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """The tracked values of a parameter, flat: a view of all of them, or a gathered copy."""
    flat = param.detach().reshape(-1)
    return flat if index is None else flat.index_select(0, index)


def _flat_copy(param: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """A contiguous copy of a parameter's tracked values (θ₀, the pre-step snapshot)."""
    if index is not None:
        return _tracked(param, index)  # index_select already copies
    return param.detach().reshape(-1).clone(memory_format=torch.contiguous_format)


def _sum_sq(flat: torch.Tensor) -> torch.Tensor:
    """Σ x² of a flat tensor in one pass without a temporary (a dot product; float32 and wider
    as is, half precision through float32), as float64."""
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return torch.dot(flat, flat).double()


class UpdateAnalytics(TrainerCallback):
    """Trainer callback logging the update statistics above every ``every`` optimizer steps."""

    def __init__(self, every: int = 10, sample: int | None = DEFAULT_SAMPLE) -> None:
        if every < 1:
            raise ForgetlessError("update analytics: 'every' must be at least 1 step")
        if sample is not None and sample < 1:
            raise ForgetlessError("update analytics: 'sample' must be at least 1 coordinate")
        self.every = every
        self.sample = sample
        self._index: list[torch.Tensor | None] = []
        self.trainer = None
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0
        self._names: list[str] = []
        self._params: list[torch.Tensor] = []
        self._start: list[torch.Tensor] = []
        self._ever: list[torch.Tensor] = []
        self._start_sq: list[torch.Tensor] = []  # ‖θ₀‖² per tensor, computed once
        self._before: list[torch.Tensor] | None = None
        self._pending: dict[str, float] | None = None
        self._last: dict[str, float] = {}

    def attach(self, trainer) -> UpdateAnalytics:
        """Add to ``trainer`` (if not yet there) and log through it."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    def _due(self, step: int, last: int) -> bool:
        return step == 1 or step % self.every == 0 or step == last

    # --- Trainer events -------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        started = time.perf_counter()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._index = [tracked_indices(p.numel(), self.sample, seed, p.device)
                       for seed, p in enumerate(self._params)]
        with torch.no_grad():  # θ₀ of a resumed run is the resume point's weights
            self._start = [_flat_copy(p, i) for p, i in zip(self._params, self._index,
                                                            strict=True)]
            self._ever = [torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
                          for s in self._start]
            self._start_sq = [_sum_sq(s) for s in self._start]
        self.seconds += time.perf_counter() - started

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._due(state.global_step + 1, state.max_steps):
            started = time.perf_counter()
            with torch.no_grad():
                self._before = [_flat_copy(p, i) for p, i in zip(self._params, self._index,
                                                                 strict=True)]
            self.seconds += time.perf_counter() - started

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._before is None:
            return
        started = time.perf_counter()
        self._pending = self.measure(state.global_step + 1)
        self._before = None
        self.seconds += time.perf_counter() - started

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending is None:
            return control
        values, self._pending = self._pending, None
        log_values(self.trainer, state, control, values)
        return control

    # --- measuring ------------------------------------------------------------------------

    def measure(self, step: int) -> dict[str, float]:
        """Compare the weights with the pre-step snapshot and θ₀; one host transfer in all.

        The snapshot's buffer is reused as scratch (first this step's update, then θ − θ₀), and
        each statistic is one reduction with no temporary (``count_nonzero``, a dot product,
        ``logical_or_`` into the mask): a quarter of the elementwise passes and none of the
        full-size allocations of the straightforward version (measured: docs/performance.md)."""
        rows = []
        with torch.no_grad():
            for param, index, before, start, ever, start_sq in zip(
                    self._params, self._index, self._before, self._start, self._ever,
                    self._start_sq, strict=True):
                now = _tracked(param, index)
                scratch = before.sub_(now)  # minus this step's update
                moved, step_sq = torch.count_nonzero(scratch), _sum_sq(scratch)
                torch.sub(now, start, out=scratch)  # θ − θ₀
                ever.logical_or_(scratch)
                row = torch.stack([moved.double(), torch.count_nonzero(ever).double(),
                                   step_sq, _sum_sq(scratch), start_sq])
                # a sample's sums -> estimates for the whole tensor
                rows.append(row if index is None else row * (param.numel() / index.numel()))
        device = rows[0].device if rows else None
        sums = torch.stack([r.to(device) for r in rows]).tolist() if rows else []
        groups: dict[str, list[float]] = {}
        for name, param, (moved, ever, step_sq, drift_sq, base_sq) in zip(
                self._names, self._params, sums, strict=True):
            for key in ("total", f"type/{module_type(name)}", f"layer/{layer_of(name)}"):
                acc = groups.setdefault(key, [0.0] * 6)
                for i, v in enumerate((moved, ever, step_sq, drift_sq, base_sq, param.numel())):
                    acc[i] += v
        values: dict[str, float] = {}
        for key, (moved, ever, step_sq, drift_sq, base_sq, numel) in groups.items():
            values[f"updates/moved/{key}"] = moved / numel
            values[f"updates/moved_ever/{key}"] = ever / numel
            values[f"updates/rms/{key}"] = (step_sq / numel) ** 0.5
            values[f"updates/drift/{key}"] = (drift_sq / base_sq) ** 0.5 if base_sq else 0.0
        self.history.append({"step": step, **{m: values.get(f"updates/{m}/total", 0.0)
                                              for m in MEASURES}})
        self._last = values
        return values

    def summary(self) -> dict[str, Any]:
        """For ``metrics.json``: settings, cost, totals per measured step, last per-type values."""
        last = self._last
        by_type = {key.split("/", 3)[3]: {m: last[f"updates/{m}/type/{key.split('/', 3)[3]}"]
                                          for m in MEASURES}
                   for key in last if key.startswith("updates/moved/type/")}
        return {"every": self.every, "sample": self.sample, "seconds": round(self.seconds, 3),
                "trainable_coordinates": sum(p.numel() for p in self._params),
                "tracked_coordinates": sum(s.numel() for s in self._start),
                # what it held: θ₀, the mask, indices, and a snapshot like θ₀ when measuring
                "bytes": sum(2 * s.nbytes + e.nbytes + (i.nbytes if i is not None else 0)
                             for s, e, i in zip(self._start, self._ever, self._index,
                                                strict=True)),
                "history": self.history, "by_type": by_type}


def install_update_analytics(trainer, config) -> list[UpdateAnalytics]:
    """Add the analytics a ``TrainConfig`` asks for (``update_stats_every``) and bind every
    ``UpdateAnalytics`` on ``trainer`` so its values go through ``Trainer.log``."""
    if config.update_stats_every:
        trainer.add_callback(UpdateAnalytics(every=config.update_stats_every,
                                             sample=config.update_stats_sample))
    found = [c for c in trainer.callback_handler.callbacks if isinstance(c, UpdateAnalytics)]
    return [c.attach(trainer) for c in found]
