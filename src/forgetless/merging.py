"""Sparse merges of a fine-tune back onto its base: TIES and DARE of the task vector τ = θ − θ₀.

Beside interpolation (``forgetless.interpolate``: θ₀ + λτ, every coordinate shrunk alike),
these keep only part of τ at full strength: the merged model is θ₀ + s·m(τ) with

* TIES (Yadav et al. 2023, arXiv 2306.01708): trim τ to its ``density`` share of largest
  magnitudes, elect a sign per coordinate across task vectors, average those that agree. With
  ONE task vector the election is trivial (every kept coordinate agrees with itself) and the
  disjoint mean divides by one, so TIES reduces to trim + scale: m(τ) = top-k(|τ|) mask ⊙ τ.
* DARE (Yu et al. 2023, arXiv 2311.03099): drop each coordinate of τ with probability
  p = 1 − density and rescale the survivors by 1/(1 − p), so E[m(τ)] = τ.

Both work tensor by tensor (as PEFT's ``merge_utils`` and MergeKit do). The trim breaks ties in
magnitude by position (the earlier coordinate is kept), and DARE draws each tensor's mask on the
CPU from a generator seeded by (seed, parameter name): a merge is the same on every rerun, its
masks do not depend on the device the model sits on (by construction; checked on the CPU only)
nor on the order parameters are visited. That is why the masks are made here rather than with
PEFT's ``prune`` (``torch.topk``'s order among equal values is unspecified; ``random_pruning``
draws from the global RNG of the tensor's device); the arithmetic after the mask equals
``peft.utils.merge_utils.ties`` / ``dare_linear`` on one task vector (tests/test_merging.py
checks it against ``ties``).

A LoRA run is merged into its base first (``interpolate.merged_copy``), so τ is the full
weight change. ``merge_run`` applies a merge to a finished run folder outside ``compare``.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from forgetless.config import validate
from forgetless.errors import ForgetlessError
from forgetless.interpolate import paired_parameters
from forgetless.io import atomic_dir
from forgetless.models import is_model_folder, load_model


class MergeSpec(BaseModel):
    """One merge: ``kind`` (ties | dare), ``density`` = share of τ kept (in (0, 1]), ``scale``
    = s > 0 on the kept τ, ``seed`` = DARE's drop seed (DARE only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["ties", "dare"]
    density: float = Field(gt=0.0, le=1.0)
    scale: float = Field(1.0, gt=0.0)
    seed: int | None = Field(None, ge=0)
    # the compare methods (entry names) whose runs are merged; null: every method. Merging is
    # a remedy for the methods that forget (full fine-tuning), and each merge is one more
    # evaluation per run.
    methods: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _seed_is_dare_only(self) -> MergeSpec:
        if self.kind == "ties" and self.seed is not None:
            raise ValueError("seed: TIES keeps the largest coordinates, nothing is drawn; "
                             "a seed applies to dare only")
        return self

    def applies_to(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    @property
    def drop_seed(self) -> int:
        return self.seed or 0

    @property
    def key(self) -> str:
        """The merge's name in file names and report rows, e.g. ``ties-d0.2``,
        ``dare-d0.1-s0.5-seed3`` (scale and seed shown when not their defaults)."""
        key = f"{self.kind}-d{self.density:g}"
        if self.scale != 1.0:
            key += f"-s{self.scale:g}"
        if self.kind == "dare" and self.drop_seed:
            key += f"-seed{self.drop_seed}"
        return key


def check_specs(specs: list[MergeSpec]) -> list[MergeSpec]:
    """Reject two entries that name the same merge (their rows and files would collide)."""
    keys = [spec.key for spec in specs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ValueError(f"two entries are the same merge: {', '.join(twice)}")
    return specs


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``int(density · numel)`` largest-magnitude coordinates zeroed
    (TIES' trim; PEFT's count). Equal magnitudes at the cut: the earlier coordinate stays."""
    flat = delta.reshape(-1)
    keep = int(density * flat.numel())
    if keep >= flat.numel():
        return delta.clone()
    if keep == 0:
        return torch.zeros_like(delta)
    magnitude = flat.abs()
    # the keep-th largest magnitude, as the (n - keep + 1)-th smallest
    cut = torch.kthvalue(magnitude, flat.numel() - keep + 1).values
    above = magnitude > cut
    at_cut = magnitude == cut
    room = keep - int(above.sum())
    mask = above | (at_cut & (torch.cumsum(at_cut, 0) <= room))
    return (flat * mask).reshape(delta.shape)


def drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each coordinate with probability ``density`` (mask drawn on the CPU from
    ``generator``) and rescale the kept ones by 1/density = 1/(1 − p)."""
    if density >= 1.0:
        return delta.clone()
    mask = torch.rand(delta.shape, generator=generator) < density
    return delta * mask.to(delta.device) / density


def _generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one tensor: the same mask whatever order the tensors come in. (The
    CPU generator keeps 32 bits of a seed, so seed and name are hashed into 32 bits.)"""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def merge_delta(delta: torch.Tensor, spec: MergeSpec, name: str = "") -> torch.Tensor:
    """s · m(τ) for one tensor ``delta`` = τ (``name`` seeds DARE's mask)."""
    if spec.kind == "ties":
        kept = trim(delta, spec.density)
    else:
        kept = drop(delta, spec.density, _generator(spec.drop_seed, name))
    return kept * spec.scale


@torch.no_grad()
def merge(base: nn.Module, tuned: nn.Module, spec: MergeSpec) -> nn.Module:
    """A new model θ₀ + s·m(θ − θ₀) (τ in float32, the result in θ₀'s dtype); both inputs
    stay unchanged."""
    out, pairs = paired_parameters(base, tuned, "merge")
    for name, param, other in pairs:
        theta0 = param.float()
        delta = other.to(param.device, torch.float32) - theta0
        if delta.any():  # a frozen tensor (a preset's, LoRA's) stays θ₀ without the work
            param.copy_(theta0 + merge_delta(delta, spec, name))
    return out.eval()


def merge_run(run_dir: str | Path, spec: MergeSpec | dict, out_dir: str | Path,
              base: str | None = None, dtype: str = "float32") -> Path:
    """Merge the model a finished run saved (``run_dir/model``, whole or a LoRA adapter) onto
    ``base`` (default: the run's ``config.yaml`` model) and save it with the run's tokenizer
    to ``out_dir`` (written to a temporary folder, renamed into place when complete)."""
    spec = spec if isinstance(spec, MergeSpec) else validate(MergeSpec, spec, where="merge")
    saved = Path(run_dir) / "model"
    if not is_model_folder(saved):
        raise ForgetlessError(f"no saved model in {saved}: merge needs a finished run "
                              "trained with save_model=true")
    if base is None:
        config = Path(run_dir) / "config.yaml"
        if not config.is_file():
            raise ForgetlessError(f"{config} is missing: give the base model explicitly")
        base = (yaml.safe_load(config.read_text()) or {}).get("model")
        if not base:
            raise ForgetlessError(f"{config} names no model: give the base model explicitly")
    tuned, tokenizer = load_model(str(saved), dtype=dtype)
    theta0 = load_model(base, dtype=dtype)[0]
    merged = merge(theta0, tuned, spec)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
