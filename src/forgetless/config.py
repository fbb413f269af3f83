"""Run configuration: YAML file + ``key=value`` overrides, validated by pydantic.

Unknown keys and bad values are errors that list the valid choices, because a typo that silently
falls back to a default would make a comparison between methods meaningless.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from forgetless.errors import ForgetlessError
from forgetless.methods.options import DEFAULT_OPTIONS as _OPTIONS

Config = TypeVar("Config", bound=BaseModel)


# Coordinates the update analytics track per tensor by default: a share's standard error is
# at most 0.2 points, and the memory about 1 MiB per float32 tensor (forgetless.updates).
UPDATE_STATS_SAMPLE = 65536


class MixSource(BaseModel):
    """One general-data source mixed into the training stream (``forgetless.mixing``).

    ``ratio`` is a share of training *examples* (rows), not tokens: the Trainer's budget is
    steps x batch size in examples, a row is the unit a user curates and counts, and an
    example share does not change with the tokenizer; the tokens each source costs are
    measured and reported beside it (``metrics.json`` "mix")."""

    model_config = ConfigDict(extra="forbid")

    source: str  # a data file, a built-in dataset name, a Hub id (owner/name), or "self"
    ratio: float  # share of the training examples, strictly between 0 and 1
    split: str = "train"  # of a built-in dataset or Hub id
    # held-out tasks (built-in names, task YAMLs, targets) no mixed row may overlap; null: every
    # built-in held-out task and the gsm8k test split (forgetless.mixing.DEFAULT_EXCLUDE)
    exclude: list[str] | None = None
    # source "self" only (forgetless.rehearsal): conversations the base model writes
    n: int | None = Field(None, ge=1)  # default rehearsal.DEFAULT_N
    prompts: str | None = None  # a prompt pool file; null: Magpie (the chat template's user turn)
    max_new_tokens: int = Field(128, ge=1)  # per answer
    seed: int | None = None  # of the generation; null: the run's seed

    @field_validator("ratio")
    @classmethod
    def _share(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError("ratio is a share of the training examples: strictly between 0 "
                             "and 1")
        return value

    @model_validator(mode="after")
    def _readable(self) -> MixSource:
        # here, not at the top: mixing sits above config (it reads the eval task registry)
        from forgetless.mixing import check_source

        check_source(self)  # unknown or unreadable sources fail here, before a model loads
        return self


class TrainConfig(BaseModel):
    """Everything one fine-tuning run needs; saved resolved next to its results."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "smollm2-135m"
    data: str = "gsm8k"
    method: str = "mofo"
    # method options: defaults and which method reads each in forgetless.methods.options
    fraction: float = Field(_OPTIONS.fraction, gt=0.0, le=1.0)
    mofo_filter: Literal["momentum", "gradient", "random"] = _OPTIONS.mofo_filter
    mofo_exact: bool = _OPTIONS.mofo_exact  # exactly the top-k set each step (slower)
    lora_r: int = Field(_OPTIONS.lora_r, ge=1)
    lora_alpha: float = Field(_OPTIONS.lora_alpha, gt=0)
    lora_dropout: float = Field(_OPTIONS.lora_dropout, ge=0.0, lt=1.0)
    anchor_weight: float = Field(_OPTIONS.anchor_weight, ge=0.0)
    lwf_weight: float = Field(_OPTIONS.lwf_weight, ge=0.0)  # λ of +lwf methods (KL to the base)
    merge_lora: bool = _OPTIONS.merge_lora
    # +kl / +asft: weight and direction of the KL to the frozen base on the response tokens
    kl_weight: float = Field(_OPTIONS.kl_weight, ge=0.0)
    kl_direction: Literal["forward", "reverse"] = _OPTIONS.kl_direction
    # +ewc: λ (in units of the mean Fisher), examples for the Fisher and their source (a file,
    # a built-in dataset, or a registered source such as self); forgetless.methods.ewc
    ewc_lambda: float = Field(_OPTIONS.ewc_lambda, ge=0.0)
    ewc_samples: int = Field(_OPTIONS.ewc_samples, ge=1)
    ewc_source: str = _OPTIONS.ewc_source
    # vision-language models (LLaMA-Factory's names): which non-text parts train as well
    freeze_vision_tower: bool = _OPTIONS.freeze_vision_tower
    freeze_multi_modal_projector: bool = _OPTIONS.freeze_multi_modal_projector
    freeze_language_model: bool = _OPTIONS.freeze_language_model
    # optimisation
    learning_rate: float = Field(2e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, ge=0.0)
    # data
    max_length: int = Field(512, ge=8)
    limit: int | None = Field(None, ge=1)
    packing: bool = False
    seed: int = 0
    # general data mixed in (forgetless.mixing); mix_budget "steps": max_steps stays, the mix
    # takes its share of the examples; "task": max_steps grows by 1/(1 - total ratio) so the
    # task examples seen stay those of an unmixed run (more tokens: reported)
    mix: list[MixSource] = Field(default_factory=list)
    mix_budget: Literal["steps", "task"] = "steps"
    # output
    output_dir: str = "runs/train"
    logging_steps: int = Field(5, ge=1)
    save_steps: int | None = Field(None, ge=1)
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    resume: bool = False
    save_model: bool = True
    # forgetting monitor (forgetless.monitor): KL / number-token mass vs the base every N steps
    monitor_every: int | None = Field(None, ge=1)
    monitor_max_kl: float | None = Field(None, gt=0.0)
    monitor_max_number_mass_gain: float | None = Field(None, gt=0.0)
    monitor_action: Literal["stop", "warn"] = "stop"
    # parameter-update analytics (forgetless.updates): moved / ever-moved share, update RMS and
    # drift per module type and layer every N optimizer steps; null turns them off.
    # update_stats_sample: coordinates tracked per tensor (a random sample above twice it:
    # estimates); null = all, exact, 9 bytes per float32 trainable parameter (updates.py)
    update_stats_every: int | None = Field(10, ge=1)
    update_stats_sample: int | None = Field(UPDATE_STATS_SAMPLE, ge=1)
    # devices and precision (forgetless.devices; README "Devices and dtypes")
    device: str = "auto"  # auto (CUDA when available, else CPU), cpu, cuda, cuda:N
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on CUDA
    fp32_master_weights: bool = True  # half dtype: trainable weights float32, autocast compute
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        from forgetless.devices import check_device_name  # torch: config loads before it

        return check_device_name(value)

    @field_validator("attn_implementation")
    @classmethod
    def _attn_available(cls, value: str) -> str:
        from forgetless.devices import check_attn_implementation  # torch: as above

        return check_attn_implementation(value)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        # methods sits a layer above config (and imports torch): a known inversion, until a
        # method's options are declared in its registry entry (issue 25, item 5)
        from forgetless.methods import parse_method

        parse_method(value)  # raises ForgetlessError listing the valid names
        return value

    @field_validator("mix", mode="before")
    @classmethod
    def _mix_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value  # one source needs no list

    @field_validator("mix")
    @classmethod
    def _mix_total(cls, value: list[MixSource]) -> list[MixSource]:
        total = sum(source.ratio for source in value)
        if total >= 1.0:
            raise ValueError(f"the ratios add up to {total:g}: the task data needs a share too "
                             "(keep the sum below 1)")
        if sum(source.source == "self" for source in value) > 1:
            raise ValueError("give source 'self' once (its n sets how many conversations)")
        return value


class MethodEntry(BaseModel):
    """One compared method: a registered ``method`` plus per-method TrainConfig overrides
    (e.g. ``fraction``, ``learning_rate``) as extra keys; ``name`` labels it (default: method)."""

    model_config = ConfigDict(extra="allow")

    method: str
    name: str | None = None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "method=attn"]`` → dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ForgetlessError(f"override '{pair}' is not key=value")
        out[key.strip()] = _scalar(value)
    return out


def _scalar(text: str) -> Any:
    """YAML scalar, but ``1e-4`` is a float (YAML 1.1 would keep it a string); text that is
    not valid YAML (``name=my run: {x``) stays the string it is."""
    try:
        value = yaml.safe_load(text) if text else ""
    except (yaml.YAMLError, RecursionError):
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise ForgetlessError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ForgetlessError(f"{path}: not a UTF-8 text file (byte {err.start}); "
                              "a config is a YAML text file") from None
    except OSError as err:
        raise ForgetlessError(f"{path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ForgetlessError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from err
    except RecursionError:
        raise ForgetlessError(f"{path}: invalid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ForgetlessError(f"{path}: the config must be a mapping of key: value")
    return data


def validate(cls: type[Config], data: dict[str, Any], where: str = "config") -> Config:
    """Build ``cls`` from ``data``; the first problem becomes one line with the valid choices."""
    odd = [key for key in data if not isinstance(key, str)]
    if odd:
        raise ForgetlessError(f"{where}: keys must be names, not {odd[0]!r}")
    try:
        return cls(**data)
    except ForgetlessError:
        raise
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "?"
        if first["type"] == "extra_forbidden":
            valid = ", ".join(sorted(cls.model_fields))
            raise ForgetlessError(f"{where}: unknown key '{key}' (valid keys: {valid})") from None
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, ForgetlessError):
            raise cause from None
        message = first["msg"]
        value = repr(first.get("input"))
        value = value if len(value) <= 200 else value[:200] + "..."
        raise ForgetlessError(f"{where}: bad value for '{key}': {value} ({message})") from None


def load_config(
    cls: type[Config], path: str | Path | None = None, overrides: list[str] | dict | None = None
) -> Config:
    """File (optional) + overrides → validated config."""
    data = load_yaml(path) if path else {}
    extra = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    return validate(cls, {**data, **extra}, where=str(path) if path else "config")


def load_sectioned_config(
    cls: type[Config],
    config: BaseModel | dict | str | Path | None = None,
    overrides: list[str] | dict | None = None,
) -> Config:
    """A config with sections (compare, continual): file, dict or object + ``key=value``
    overrides whose dotted keys reach into sections (``train.max_steps=5``, ``eval.limit=50``)."""
    if isinstance(config, BaseModel):
        data, where = config.model_dump(), "config"
    elif isinstance(config, str | Path):
        data, where = load_yaml(config), str(config)
    else:
        data, where = dict(config or {}), "config"
    extra = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    for key, value in extra.items():
        section = data
        *parents, last = key.split(".")
        for part in parents:
            section = section.setdefault(part, {})
            if not isinstance(section, dict):
                raise ForgetlessError(f"override '{key}': '{part}' is not a section")
        section[last] = value
    return validate(cls, data, where=where)
