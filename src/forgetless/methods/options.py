"""Each method option declared once: its name, default and the method that reads it.

``TrainConfig`` takes its defaults from here (adding bounds a YAML value must keep), ``train``
builds ``MethodOptions`` from a config by these names, and ``tune`` samples an option only for
a method that reads it (``USED_BY``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from forgetless.errors import ForgetlessError

KL_DIRECTIONS = ("forward", "reverse")  # of ``+kl``: KL(base ‖ model) or KL(model ‖ base)


def _for(method: str, default: Any) -> Any:
    """A default read only by ``method`` (a base method or the ``mofo`` modifier)."""
    return field(default=default, metadata={"method": method})


@dataclass
class MethodOptions:
    """Knobs of every method; each method reads only its own.

    ``anchor_weight`` scales Σ‖θ−θ₀‖² (L2) or Σ|θ−θ₀| (L1) over the trainable parameters. The
    default 0.01 is sized for L2 at fine-tuning learning rates: on SmolLM2-135M, 10 full AdamW
    steps at lr 2e-5 drifted Σ‖θ−θ₀‖² to 2.3, so by ~100 steps the penalty is on the scale of
    the LM loss, a pull that grows with drift without freezing anything. L1's gradient per
    weight is w·sign(θ−θ₀) rather than 2·w·(θ−θ₀); at 0.01 it would swamp SmolLM2's loss
    gradients (median |g| 1e-4, RMS 1e-3 per weight), so l1-anchor wants ~1e-4 or less.
    ``lora_targets``: ``None`` = every attention + MLP projection of the language model, a
    preset name (``"attn"``, ``"mlp-gate-up"``, ...) or module-name suffixes (``["q_proj"]``),
    always looked up inside the language model only.
    """

    fraction: float = _for("mofo", 0.1)
    mofo_filter: str = _for("mofo", "momentum")
    mofo_exact: bool = _for("mofo", False)
    lora_r: int = _for("lora", 8)
    lora_alpha: float = _for("lora", 16.0)
    lora_dropout: float = _for("lora", 0.0)
    lora_targets: list[str] | str | None = None  # library only (not a TrainConfig key)
    # merge the adapters into the weights after training (``forgetless.train`` does it)
    merge_lora: bool = _for("lora", False)
    anchor_weight: float = _for("anchor", 1e-2)
    # λ of ``+lwf``: loss = CE + λ·KL(base ‖ model) per token (docs/results.md, "LwF weight").
    # Not marked for lwf: tune has always sampled it for every method, and a trial's folder
    # name hashes what it sampled.
    lwf_weight: float = 1.0
    # ``+kl`` / ``+asft``: loss gains kl_weight · KL to the frozen base on the response tokens.
    # 0.1 is LLaMA-Factory's asft_alpha default (provisional here: not measured by forgetless).
    kl_weight: float = _for("kl", 0.1)
    kl_direction: str = _for("kl", "forward")  # forward KL(base ‖ model), as ASFT; or reverse
    # ``+ewc``: λ in units of the mean Fisher (methods/ewc.py). 0.02 = l2-anchor's 0.01 pull
    # where the Fisher is flat (λ/2 · Σ(θ−θ₀)²), stronger where the general examples need the
    # weights; provisional, not measured. Then the examples its Fisher is estimated on and where
    # they come from (a file, a built-in dataset, or a registered source such as ``self``).
    ewc_lambda: float = _for("ewc", 0.02)
    ewc_samples: int = _for("ewc", 64)
    ewc_source: str = _for("ewc", "self")
    # A VLM's parts (LLaMA-Factory's names): the method picks what trains in the language
    # model; the vision tower and projector train only when unfrozen (then fully).
    freeze_vision_tower: bool = True
    freeze_multi_modal_projector: bool = True
    freeze_language_model: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ForgetlessError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.lora_r < 1:
            raise ForgetlessError(f"lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ForgetlessError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.anchor_weight < 0:
            raise ForgetlessError(f"anchor_weight must be >= 0, got {self.anchor_weight}")
        if self.lwf_weight < 0:
            raise ForgetlessError(f"lwf_weight must be >= 0, got {self.lwf_weight}")
        if self.kl_weight < 0:
            raise ForgetlessError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.kl_direction not in KL_DIRECTIONS:
            raise ForgetlessError(f"kl_direction must be one of {', '.join(KL_DIRECTIONS)}, "
                                  f"got {self.kl_direction!r}")
        if self.ewc_lambda < 0:
            raise ForgetlessError(f"ewc_lambda must be >= 0, got {self.ewc_lambda}")
        if self.ewc_samples < 1:
            raise ForgetlessError(f"ewc_samples must be >= 1, got {self.ewc_samples}")


DEFAULT_OPTIONS = MethodOptions()
# The options a TrainConfig carries (``lora_targets`` is for library callers only).
OPTION_NAMES = tuple(f.name for f in fields(MethodOptions) if f.name != "lora_targets")
# option -> the part of a method that reads it: "mofo" = any ``+mofo`` method, "lora", "anchor"
# (``l1-anchor``, ``l2-anchor``), "kl" (``+kl``, ``+asft``), "ewc" (``+ewc``);
# ``methods.registry.uses_option`` answers it for a method name.
USED_BY = {f.name: f.metadata["method"] for f in fields(MethodOptions) if "method" in f.metadata}


# Options added after run folders existed: a run's identity names them only away from these
# defaults, so the folders made before them are still reused (jobs/identity.py).
LATER_OPTIONS = {name: getattr(DEFAULT_OPTIONS, name) for name in
                 ("kl_weight", "kl_direction", "ewc_lambda", "ewc_samples", "ewc_source")}


def method_options(config: Any) -> MethodOptions:
    """The options a config (``TrainConfig`` or anything with those attributes) sets."""
    return MethodOptions(**{name: getattr(config, name) for name in OPTION_NAMES})
