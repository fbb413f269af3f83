"""``LossProgress``: one progress bar per run showing the loss, instead of raw log dicts.

transformers' ``ProgressCallback`` / ``PrinterCallback`` print every ``Trainer.log`` dict to the
terminal, and with the forgetting monitor and update analytics each dict holds dozens of keys:
a compare of six methods scrolls by as noise. forgetless jobs replace them with this bar
(tqdm; drawn only on a terminal), whose postfix keeps the last loss and, when they are logged,
the KL to the base and the share of coordinates moved so far; everything still reaches
TensorBoard / MLflow through ``Trainer.log``. One line per run is printed at the end, also off a
terminal (CI logs), so a log file keeps the outcome.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

# logged key -> short postfix name (float values only)
_POSTFIX = {"loss": "loss", "forgetting/kl": "kl", "updates/moved_ever/total": "moved"}


class LossProgress(TrainerCallback):
    """A tqdm bar over the optimizer steps of one run, labelled ``label``.

    ``enabled=None`` draws it only when stderr is a terminal; the closing line is printed
    either way (on the main process only)."""

    def __init__(self, label: str, enabled: bool | None = None) -> None:
        self.label = label
        self.enabled = enabled
        self.bar: Any = None
        self.postfix: dict[str, str] = {}
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self._started = 0.0
        self._step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from tqdm.auto import tqdm

        show = sys.stderr.isatty() if self.enabled is None else self.enabled
        self.bar = tqdm(total=state.max_steps, desc=self.label, unit="step", dynamic_ncols=True,
                        disable=not show, initial=state.global_step, file=sys.stderr)
        self._step = state.global_step
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self._step)
            self._step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        for key, short in _POSTFIX.items():
            value = logs.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.postfix[short] = f"{100 * value:.1f}%" if short == "moved" else f"{value:.4g}"
                if key == "loss":
                    self.first_loss = value if self.first_loss is None else self.first_loss
                    self.last_loss = value
        self.bar.set_postfix(self.postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        self.bar.close()
        self.bar = None
        loss = ("" if self.first_loss is None
                else f", loss {self.first_loss:.4g} → {self.last_loss:.4g}")
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items() if k != "loss")
        print(f"[forgetless] {self.label}: {state.global_step}/{state.max_steps} steps in "
              f"{time.perf_counter() - self._started:.0f} s{loss}{extra}", flush=True)


def use_loss_progress(trainer, label: str) -> LossProgress:
    """Swap the Trainer's printing callbacks for one ``LossProgress`` bar."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    progress = LossProgress(label)
    trainer.add_callback(progress)
    return progress
