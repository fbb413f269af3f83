"""``ForgettingMonitor``: see forgetting while a run trains, and stop it before it is too late.

Every ``every`` optimizer steps it measures on a small fixed probe set of held-out prompts the
per-token KL(base || model), top-1 agreement and the probability mass on number tokens (the
symptom of arXiv 2510.08564), optionally a quick held-out accuracy, and logs them through
``Trainer.log`` so TensorBoard and MLflow plot them beside the loss. When ``max_kl`` or
``max_number_mass_gain`` is crossed it warns or sets ``control.should_training_stop``.

The base is a frozen copy of the model taken when training begins (also for LoRA: merged
adapters change the weights the KL is measured against, so a copy is the honest reference).
At the end it prints its own cost as a share of the training time.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from transformers import TrainerCallback

from forgetless.devices import model_device
from forgetless.errors import ForgetlessError
from forgetless.eval import (
    DEFAULT_SUITE,
    default_drift_prompts,
    evaluate,
    kl_and_number_mass,
    load_spec,
    load_task,
)

PROBE_SIZE = 16
PROBE_MAX_LENGTH = 128


def _say(message: str) -> None:
    print(f"[forgetless monitor] {message}", flush=True)


def default_probe_prompts(n: int = PROBE_SIZE, seed: int = 0) -> list[str]:
    """Contexts of the default held-out suite (ARC-Easy, PIQA) dealt round-robin."""

    per_task = -(-n // len(DEFAULT_SUITE))
    tasks = [load_task(load_spec(name), per_task, seed, 0) for name in DEFAULT_SUITE]
    return default_drift_prompts(tasks, n)


def log_values(trainer: Any, state: Any, control: Any, values: dict[str, float]) -> None:
    """Log a callback's measurements through ``trainer.log`` (so MLflow and TensorBoard see
    them live), or into ``state.log_history`` when no Trainer was attached."""
    if trainer is None:
        state.log_history.append({**values, "step": state.global_step})
        return
    due = control.should_log  # Trainer.log clears it; the loss log of this step is due
    trainer.log(dict(values))
    control.should_log = due


class ForgettingMonitor(TrainerCallback):
    """Trainer callback measuring drift from the base every ``every`` steps.

    ``action="stop"`` ends the run at the first crossed threshold (reason in ``stopped`` and in
    ``state.log_history``); ``"warn"`` only prints. Bind it to the trainer (``attach``) so the
    values go through ``Trainer.log``; unbound, they are appended to ``state.log_history`` only.
    """

    def __init__(
        self,
        every: int = 50,
        max_kl: float | None = None,
        max_number_mass_gain: float | None = None,
        action: Literal["stop", "warn"] = "stop",
        prompts: Sequence[str] | None = None,
        max_length: int = PROBE_MAX_LENGTH,
        accuracy_items: int = 0,
        base_model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        if every < 1:
            raise ForgetlessError("monitor: 'every' must be at least 1 step")
        if action not in ("stop", "warn"):
            raise ForgetlessError(f"monitor: action must be 'stop' or 'warn', not '{action}'")
        self.every, self.max_kl, self.action = every, max_kl, action
        self.max_number_mass_gain = max_number_mass_gain
        self.prompts = list(prompts) if prompts is not None else None
        self.max_length, self.accuracy_items = max_length, accuracy_items
        self.base, self.tokenizer = base_model, tokenizer
        self.trainer = None
        self.history: list[dict[str, float]] = []
        self.stopped: dict[str, Any] | None = None
        self.seconds = 0.0
        self._started = 0.0
        self.train_seconds = 0.0
        self._autocast: torch.dtype | None = None

    def attach(self, trainer) -> ForgettingMonitor:
        """Add to ``trainer`` (if not yet there) and log through it."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    # --- measuring ------------------------------------------------------------------------

    def measure(self, model) -> dict[str, float]:
        """Drift of ``model`` from the frozen base on the probe prompts (plain floats)."""

        device = model_device(model).type
        autocast = (torch.autocast(device, dtype=self._autocast) if self._autocast is not None
                    else contextlib.nullcontext())
        with autocast:
            drift = kl_and_number_mass(model, self.base, self.tokenizer, self.prompts,
                                       max_length=self.max_length)
        values = {f"forgetting/{k}": m.value for k, m in drift.items()}
        values["forgetting/number_mass_gain"] = (
            values["forgetting/number_mass"] - values["forgetting/number_mass_base"]
        )
        if self.accuracy_items:
            result = evaluate(model, self.tokenizer, limit=self.accuracy_items, batch_size=8)
            values["forgetting/heldout_acc"] = result.metrics["heldout/acc"].value
        return values

    def breaches(self, values: dict[str, float]) -> list[str]:
        """Human-readable thresholds crossed by ``values``."""
        out = []
        if self.max_kl is not None and values["forgetting/kl"] > self.max_kl:
            out.append(f"KL to base {values['forgetting/kl']:.4f} > max_kl {self.max_kl:g}")
        gain = values["forgetting/number_mass_gain"]
        if self.max_number_mass_gain is not None and gain > self.max_number_mass_gain:
            out.append(f"number-token mass gain {gain:.4f} > max_number_mass_gain "
                       f"{self.max_number_mass_gain:g}")
        return out

    # --- Trainer events -------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.tokenizer = self.tokenizer or processing_class
        if self.tokenizer is None:
            raise ForgetlessError("ForgettingMonitor needs the tokenizer (pass tokenizer=)")
        if self.base is None:
            if state.global_step > 0:
                _say(f"resumed at step {state.global_step}: KL is measured against the weights "
                     "of the resume point (pass base_model= for the original base)")
            self.base = _own_forward(copy.deepcopy(model)).eval().requires_grad_(False)
        # The Trainer's mixed precision (bf16=/fp16=, TRL's SFTConfig default) is an autocast
        # wrapper around the model's forward; measure() runs both models under the same one.
        self._autocast = (torch.bfloat16 if getattr(args, "bf16", False)
                          else torch.float16 if getattr(args, "fp16", False) else None)
        if self.prompts is None:
            self.prompts = default_probe_prompts()
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return control
        started = time.perf_counter()
        values = self.measure(model)
        self.seconds += time.perf_counter() - started
        self.history.append({"step": state.global_step, **values})
        log_values(self.trainer, state, control, values)
        crossed = self.breaches(values)
        if crossed:
            reason = "; ".join(crossed)
            if self.action == "stop":
                control.should_training_stop = True
                self.stopped = {"step": state.global_step, "reason": reason}
                state.log_history.append({"forgetting_monitor_stop": reason,
                                          "step": state.global_step})
                _say(f"stopping at step {state.global_step}: {reason}")
            else:
                _say(f"warning at step {state.global_step}: {reason}")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        total = time.perf_counter() - self._started
        self.train_seconds = max(total - self.seconds, 1e-9)
        _say(f"{len(self.history)} checks took {self.seconds:.1f} s = "
             f"{100 * self.overhead:.1f}% of the {self.train_seconds:.0f} s of training")

    @property
    def overhead(self) -> float:
        """Monitor time / training time without the monitor."""
        return self.seconds / self.train_seconds if self.train_seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {"every": self.every, "max_kl": self.max_kl, "checks": len(self.history),
                "seconds": round(self.seconds, 2), "overhead": round(self.overhead, 4),
                "stopped": self.stopped, "last": self.history[-1] if self.history else None}


def _own_forward(model):
    """``model`` (a fresh deep copy) with its class's forward again.

    Mixed precision in accelerate (the Trainer's ``bf16=``/``fp16=``) sets ``model.forward`` to
    an autocast wrapper that closes over the *original* model's bound forward; ``deepcopy``
    copies the wrapper but not what it closes over, so the copy would silently run the live
    model and every KL would be 0. ``measure`` applies the autocast itself instead.
    """
    if "_original_forward" in model.__dict__:
        model.__dict__.pop("forward", None)
        model.__dict__.pop("_original_forward", None)
    return model


def install_monitors(trainer, config) -> list[ForgettingMonitor]:
    """Add the monitor a ``TrainConfig`` asks for (``monitor_every``) and bind every monitor
    on ``trainer`` so its values go through ``Trainer.log``."""
    if config.monitor_every:
        trainer.add_callback(ForgettingMonitor(
            every=config.monitor_every, max_kl=config.monitor_max_kl,
            max_number_mass_gain=config.monitor_max_number_mass_gain,
            action=config.monitor_action,
        ))
    monitors = [c for c in trainer.callback_handler.callbacks if isinstance(c, ForgettingMonitor)]
    return [m.attach(trainer) for m in monitors]
