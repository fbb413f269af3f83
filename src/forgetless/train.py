"""Fine-tuning on the transformers ``Trainer``, with the method's parameter choice and optimizer.

The Trainer gives users what they already know (gradient accumulation, checkpoints, resume,
logging, ``accelerate launch``); forgetless only supplies which parameters train, the optimizer
(AdamW or MoFO), an optional anchor penalty, and a run folder whose ``metrics.json`` appears last,
so a folder without it is an unfinished run.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import (
    DefaultFlowCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from forgetless import __version__, runs
from forgetless.config import TrainConfig, load_config
from forgetless.data import build_dataset, data_collator, load_conversations
from forgetless.devices import dtype_name, resolve_device, resolve_dtype
from forgetless.errors import ForgetlessError
from forgetless.io import atomic_dir, atomic_write_json, atomic_write_text, fault_point
from forgetless.methods import merge_lora, parse_method, prepare_model
from forgetless.methods.ewc import check_fisher_source, fit_fisher
from forgetless.methods.freeze import num_layers_of_config
from forgetless.methods.options import method_options
from forgetless.mixing import build_mixed, rehearsal_source, summary_line
from forgetless.models import is_alias, load_model, resolve_model
from forgetless.monitor import install_monitors
from forgetless.optim.zero import ZeroLayoutCallback
from forgetless.progress import use_loss_progress
from forgetless.updates import install_update_analytics


@dataclass
class TrainResult:
    """What a run produced; ``model`` is the tuned model still in memory (for evaluation)."""

    config: TrainConfig
    run_dir: Path
    model_dir: Path | None
    metrics: dict[str, Any]
    loss_history: list[dict[str, float]] = field(default_factory=list)
    model: Any = None
    tokenizer: Any = None


class _ForgetlessTrainer(Trainer):
    """A Trainer that adds the method's regulariser (e.g. L2 pull to θ₀) and LwF term (KL to
    the frozen base on this batch) to the loss and stops on a non-finite loss (the stock
    Trainer only hides such losses from its logs; ``_FiniteLossCheck``)."""

    def __init__(self, *args: Any, regularizer: Any = None, optimizer_factory: Any = None,
                 distiller: Any = None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer
        self.distiller = distiller
        self.optimizer_factory = optimizer_factory
        self.method_optimizer: torch.optim.Optimizer | None = None
        self.finite_check = _FiniteLossCheck()  # right after the Trainer's flow callback,
        handler = self.callback_handler.callbacks  # whose should_log/should_save it reads
        handler.insert(1 + next((i for i, c in enumerate(handler)
                                 if isinstance(c, DefaultFlowCallback)), -1), self.finite_check)

    def create_optimizer(self, model=None):
        """The method's optimizer, built when the Trainer asks: FSDP2 then shards its parameters
        and DeepSpeed wraps it (a ready optimizer passed in is refused or replaced by both)."""
        if self.optimizer is None and self.optimizer_factory is not None:
            self.optimizer = self.method_optimizer = self.optimizer_factory()
        return super().create_optimizer(model)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's micro-batches of one optimizer step; also counts their LwF positions,
        so the KL is a mean over the whole step like the CE loss (see ``_extra_loss``)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.distiller is not None and batches:
            self._step_positions = sum(self.distiller.positions(b) for b in batches)
        return batches, num_items

    def _extra_loss(self, model, inputs, outputs, num_items_in_batch) -> torch.Tensor | None:
        """Anchor penalty + LwF term for this micro-batch, scaled so that a step's micro-batches
        add up to penalty + λ·mean KL over the step whatever ``grad_accum`` is: the Trainer
        either divides the whole loss by the micro-batch count (we pre-multiply) or, when the
        model normalised its CE by the step's token count, divides nothing (we divide the
        penalty by the micro-batch count and the KL sum by the step's positions)."""
        training = model.training
        micro = getattr(self, "current_gradient_accumulation_steps", None) if training else 1
        micro = micro or self.args.gradient_accumulation_steps
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:  # the Trainer's own test in training_step
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)
        undo = 1 if scaled else micro  # what the Trainer will divide this loss by
        extra = None
        if self.regularizer is not None:
            extra = self.regularizer(model) * (undo / micro)
        if self.distiller is not None:
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
            positions = getattr(self, "_step_positions", None) if training else None
            kl = self.distiller(logits, inputs, positions)
            kl = kl * undo if positions is not None else kl * (undo / micro)
            extra = kl if extra is None else extra + kl
        return extra

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        need_outputs = return_outputs or self.distiller is not None
        # A compute_loss_func (+dft) makes the Trainer pop the labels; +kl still needs them.
        given = dict(inputs) if self.compute_loss_func is not None else inputs
        result = super().compute_loss(model, given, need_outputs, num_items_in_batch)
        loss, outputs = result if need_outputs else (result, None)
        extra = self._extra_loss(model, inputs, outputs, num_items_in_batch)
        if extra is not None:
            loss = loss + extra
        if model.training:
            self.finite_check.record(loss, self.state.global_step + 1)
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if _internal_call:
            fault_point("train.checkpoint")  # weights written, optimizer and state not yet


class _FiniteLossCheck(TrainerCallback):
    """Stops training on a non-finite loss without a host sync per micro-batch.

    ``record`` only folds each micro-batch's loss into flags on the loss's device (the first
    bad value and its step); the host reads them once at the end of an optimizer step that
    logs, saves or ends training, where the Trainer syncs anyway (``loss.item()`` for its
    log), so a non-finite loss never reaches a log line, a checkpoint or ``metrics.json``.
    Under a multi-process launch the flag is all-reduced there, so every process stops at the
    same step. ``torch.isfinite(loss)`` checked on the host every micro-batch made the device
    drain its queue between each forward and backward.
    """

    def __init__(self) -> None:
        self.seen: torch.Tensor | None = None  # bool: some loss so far was not finite
        self.value: torch.Tensor | None = None  # the first such loss
        self.step: torch.Tensor | None = None  # and its optimizer step

    def record(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float().sum()  # a NaN or inf anywhere stays one
        bad = ~torch.isfinite(loss)
        if self.seen is None:
            self.seen, self.value = bad, loss
            self.step = torch.full((), step, dtype=torch.int64, device=loss.device)
            return
        first = bad & ~self.seen
        self.value = torch.where(first, loss, self.value)
        self.step = torch.where(first, step, self.step)
        self.seen = self.seen | bad

    def check(self) -> None:
        """One host read of the flags (raises ForgetlessError on a non-finite loss)."""
        if self.seen is None:
            return
        seen = self.seen.to(torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX)
        if not seen.item():
            return
        if not self.seen.item():
            raise ForgetlessError("training loss became non-finite on another process: "
                                  "lower learning_rate or check the data")
        raise ForgetlessError(
            f"training loss became {self.value.item()} at step {self.step.item()}: "
            "lower learning_rate or check the data"
        )

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_training_stop:
            self.check()

    def on_train_end(self, args, state, control, **kwargs):
        self.check()


class _CheckpointMarker(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has written all of it (see runs.py),
    and gives the fault tests a point between training steps."""

    def on_step_end(self, args, state, control, **kwargs):
        fault_point("train.step")

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's shards are written before the marker
        if state.is_world_process_zero:
            runs.mark_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}",
                                 state.global_step)
            fault_point("train.checkpoint_marked")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer state tensors (moments etc.), for the cost column of reports."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def _sharded_launch() -> bool:
    """FSDP or DeepSpeed under ``accelerate launch``: they place, shard and cast the weights."""
    return any(os.environ.get(key, "").lower() == "true"
               for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


def check_launch(method: str) -> None:
    """Methods with an anchor penalty or an LwF term are refused under FSDP / DeepSpeed, before
    a model loads. ``AnchorPenalty`` holds the Parameter objects ``prepare_model`` made: FSDP2
    swaps in new sharded ones after ``prepare`` (the penalty would read abandoned tensors and
    be 0, with a full copy on each process) and ZeRO-3 frees their data between forward and
    backward; anchors held as shards of the sharded parameters are not built yet. LwF's base
    copy is a whole model on every process, not run under either yet."""
    if not _sharded_launch():
        return
    choice = parse_method(method)
    term = ("an anchor penalty" if choice.base.anchor is not None
            else "an LwF term" if choice.lwf else None)
    if term is not None:
        raise ForgetlessError(
            f"method '{choice.name}' has {term}, supported in one process and under DDP "
            "(accelerate launch with configs/accelerate/ddp.yaml), not under FSDP or DeepSpeed; "
            "use DDP or a method without it")


def _check_device(device: torch.device, dtype: torch.dtype, config: TrainConfig) -> None:
    """Settings the Trainer cannot honour fail here, before a model loads."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    if device.type == "cuda" and device.index not in (None, 0) and not launched:
        raise ForgetlessError(
            f"device {device}: the Trainer trains one process on cuda:0 (one GPU per process "
            f"under accelerate launch); run with CUDA_VISIBLE_DEVICES={device.index} device=cuda"
        )
    if dtype == torch.float16 and not config.fp32_master_weights:
        raise ForgetlessError("dtype float16 needs fp32_master_weights=true (the loss scaler "
                              "cannot unscale float16 gradients); or use dtype bfloat16")
    if dtype == torch.float16 and device.type != "cuda":
        raise ForgetlessError(f"dtype float16 trains on CUDA only (device {device}); "
                              "use bfloat16 or float32")


def _floating_dtype(model) -> torch.dtype:
    """The dtype of a model's (first) floating-point weights."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def cast_trainable(model, dtype: torch.dtype) -> None:
    """Cast the trainable parameters in place: the same Parameter objects, so the anchor and the
    optimizer built later still hold them."""
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _checkpointing(enabled: bool) -> dict[str, Any]:
    """Activation checkpointing as this transformers spells it (``gradient_checkpointing`` is
    the pre-5.x name). Non-reentrant, so it works with frozen embeddings (PEFT, narrow presets)
    without ``enable_input_require_grads``."""
    if not enabled:
        return {}
    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else (
        "gradient_checkpointing")
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}


def _training_arguments(
    config: TrainConfig, trainer_dir: Path, device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> TrainingArguments:
    """Trainer settings; ``dtype`` bf16/fp16 turns on the Trainer's autocast (``bf16=``/``fp16=``)
    and ``device`` its placement (``use_cpu``)."""
    device = device or resolve_device(config.device)
    return TrainingArguments(
        output_dir=str(trainer_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        # No host sync per micro-batch for the Trainer's NaN filter: a non-finite loss stops
        # the run instead (_FiniteLossCheck), so there is nothing to filter.
        logging_nan_inf_filter=False,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        report_to=config.report_to,
        seed=config.seed,
        use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        **_checkpointing(config.gradient_checkpointing),
        remove_unused_columns=False,
        dataloader_drop_last=False,
    )


def _run_label(config: TrainConfig) -> str:
    """The progress bar's name: the method, and the run folder when it says more (compare's
    ``runs/<name>``, continual's ``stage2-sums``)."""
    folder = Path(config.output_dir).name
    return config.method if folder in (config.method, "train") else f"{folder} ({config.method})"


def _check_model_name(name: str) -> None:
    """A missing model folder or file fails now; aliases and GGUF files resolve (and convert,
    once) only when the model loads."""

    path = Path(name).expanduser()
    if is_alias(name):
        return
    if not (path.suffix == ".gguf" and path.is_file()):
        resolve_model(name)


def check_training_sets(tokenizer: Any, configs: list[TrainConfig]) -> None:
    """Build each distinct training set once as ``train`` will, so a ``max_length`` that cuts
    every response (or packing for a VLM) fails before a compare or continual run spends
    minutes on the base evaluation and earlier methods, not at the method that trains it; a
    method the launch cannot run (``check_launch``) fails here too."""
    for config in configs:
        check_launch(config.method)
    seen: set[tuple] = set()
    for config in configs:
        seed = config.seed if config.limit is not None else None  # order matters when cut
        key = (config.data, config.max_length, config.limit, seed, config.packing)
        if key not in seen:
            seen.add(key)
            build_dataset(tokenizer, config.data, config.max_length, config.limit,
                          config.seed, config.packing)
        if config.mix and not any(m.source == "self" for m in config.mix):
            mixed = (key, repr(config.mix), config.mix_budget, config.max_steps)
            if mixed not in seen:
                seen.add(mixed)
                build_mixed(config, tokenizer)


def check_method_inputs(config: TrainConfig, model: Any = None) -> None:
    """What a method needs beyond its name, checked before a model loads: an ``+ewc`` Fisher
    source that can be read, a layer selection that fits the model's layer count (read from
    its config; an in-memory ``model`` is checked when prepared)."""
    choice = parse_method(config.method)
    if choice.ewc:
        check_fisher_source(config.ewc_source)
    if choice.layers is None:
        return
    layers = None
    if model is not None and hasattr(model, "config"):
        layers = num_layers_of_config(model.config)
    elif model is None:
        from transformers import AutoConfig  # only here: a config read before any model loads

        try:
            layers = num_layers_of_config(AutoConfig.from_pretrained(resolve_model(config.model)))
        except (OSError, ValueError, ForgetlessError):
            layers = None  # not readable yet (a GGUF, a VLM built on first use): prepare checks
    if layers is not None:
        choice.layers.check(layers, f"method '{choice.name}' on {config.model}")


def train(
    config: TrainConfig | dict | str | Path | None = None,
    callbacks: list[TrainerCallback] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune per ``config`` (object, dict, or YAML path; keyword overrides win).

    ``model`` is either a name like the config key (alias, folder, .gguf, Hub id) or an
    in-memory model passed with its ``tokenizer`` (e.g. the previous stage of a continual run).
    """
    if isinstance(model, str | Path):
        overrides["model"], model = str(model), None
    if isinstance(config, TrainConfig):
        config = config.model_copy(update=overrides) if overrides else config
        config = TrainConfig(**config.model_dump())  # re-validate updated fields
    elif isinstance(config, dict) or config is None:
        config = load_config(TrainConfig, None, {**(config or {}), **overrides})
    else:
        config = load_config(TrainConfig, config, overrides)

    resolve_device(config.device)  # a GPU that is not there fails before anything
    check_launch(config.method)  # methods FSDP / DeepSpeed cannot run, before a model loads
    check_method_inputs(config, model)
    if model is None:  # a bad name or data (a missing image too) fails before a model loads
        _check_model_name(config.model)
        load_conversations(config.data, "train")
    with runs.RunLock(config.output_dir, "train"):
        return _train_locked(config, callbacks, model, tokenizer)


def _train_locked(config: TrainConfig, callbacks: list[TrainerCallback] | None, model: Any,
                  tokenizer: Any) -> TrainResult:
    """``train`` once the config is valid and this process owns the run folder."""
    device = resolve_device(config.device)
    run_dir = Path(config.output_dir)
    # The folder's one writer: under accelerate launch, rank 0 holds the RunLock and clears
    # leftover temporaries, which would delete another rank's half-written config.yaml.
    if runs.main_process():
        atomic_write_text(run_dir / "config.yaml",
                          yaml.safe_dump(config.model_dump(), sort_keys=False))
        (run_dir / "metrics.json").unlink(missing_ok=True)  # this run is not finished yet
    set_seed(config.seed)

    # Device and precision (README "Devices and dtypes"): the weights load in ``dtype`` on
    # ``device``; with a half dtype the trainable ones train in float32 (fp32_master_weights)
    # under the Trainer's autocast, and go back to ``dtype`` before saving and evaluation.
    sharded = _sharded_launch()
    if model is None:
        dtype = resolve_dtype(config.dtype, device)
        _check_device(device, dtype, config)
        model, tokenizer = load_model(
            config.model, dtype=dtype, device=None if sharded else device,
            attn_implementation=config.attn_implementation,
        )
    elif tokenizer is None:
        raise ForgetlessError("train(): pass the tokenizer together with an in-memory model")
    else:  # dtype auto keeps an in-memory model's own dtype; an explicit one casts it
        dtype = _floating_dtype(model) if config.dtype == "auto" else resolve_dtype(config.dtype)
        _check_device(device, dtype, config)
        if _floating_dtype(model) != dtype:  # .to() would also recast float32 buffers (RoPE)
            model.to(dtype)
    half = dtype in (torch.bfloat16, torch.float16)
    master = torch.float32 if half and config.fp32_master_weights else dtype
    if sharded and master != dtype:
        model.to(master)  # FSDP / DeepSpeed keep float32 shards and compute in half themselves
    mixed = None
    if config.mix:  # before the method wraps the model: self-rehearsal asks the base
        mixed = build_mixed(config, tokenizer, rehearsal_source(model, tokenizer, config.seed))
    prepared = prepare_model(model, config.method, method_options(config))
    if not sharded:
        cast_trainable(prepared.model, master)
    precision = dtype_name(dtype) + (" (float32 master weights)" if master != dtype else "")
    print(f"[forgetless] {config.method}: {prepared.summary()}; {device}, {precision}",
          flush=True)

    dataset = mixed.dataset if mixed is not None else build_dataset(
        tokenizer, config.data, config.max_length, config.limit, config.seed, config.packing
    )
    if prepared.method.ewc:  # the Fisher of the base, before any step (resume: the saved one)
        fit_fisher(prepared.regularizer, prepared.model, tokenizer, source=config.ewc_source,
                   samples=config.ewc_samples, seed=config.seed, max_length=config.max_length,
                   model_name=config.model, folder=run_dir, resume=config.resume,
                   autocast_dtype=dtype if master != dtype else None,
                   write=runs.main_process())
    trainer_dir = run_dir / "trainer"
    args = _training_arguments(config, trainer_dir, device, dtype)
    if mixed is not None:  # the stream is in order already (forgetless.mixing)
        args.max_steps, args.train_sampling_strategy = mixed.max_steps, "sequential"

    def make_optimizer() -> torch.optim.Optimizer:
        return prepared.make_optimizer(
            lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.999), eps=1e-8
        )

    trainer = _ForgetlessTrainer(
        model=prepared.model,
        args=args,
        train_dataset=dataset,
        data_collator=data_collator(tokenizer, config.max_length),
        processing_class=tokenizer,
        # ZeroLayoutCallback: MoFO under DeepSpeed ZeRO; _CheckpointMarker: complete checkpoints
        callbacks=[*(callbacks or []), ZeroLayoutCallback(), _CheckpointMarker()],
        regularizer=prepared.regularizer,
        distiller=prepared.distiller,
        compute_loss_func=prepared.loss_func,
        optimizer_factory=make_optimizer,
    )
    distributed = trainer.accelerator.num_processes > 1
    if distributed and config.save_model and config.merge_lora:
        raise ForgetlessError("merge_lora under accelerate launch: train, then merge in 1 process")
    use_loss_progress(trainer, _run_label(config))  # one bar with the loss, not log dicts
    monitors = install_monitors(trainer, config)  # ForgettingMonitor, if asked for
    # UpdateAnalytics compare whole tensors: not with FSDP / DeepSpeed shards
    analytics = [] if sharded else install_update_analytics(trainer, config)
    # Only a complete checkpoint counts; a fresh run clears old ones (they would be overwritten
    # one by one, and a kill in between would leave two runs' files in one checkpoint).
    resume = runs.resume_checkpoint(trainer_dir) if config.resume else None
    if not config.resume and trainer.is_world_process_zero():
        for old in runs.checkpoints(trainer_dir):
            shutil.rmtree(old)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start

    losses = [
        {"step": log["step"], "loss": log["loss"]} for log in trainer.state.log_history
        if "loss" in log
    ]
    tuned = prepared.model
    if not sharded:
        cast_trainable(tuned, dtype)  # saved and evaluated in the run's dtype, on its device
    model_dir = None
    if config.save_model and distributed:  # all processes gather shards, the main one writes
        model_dir = run_dir / "model"
        trainer.save_model(str(model_dir))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(model_dir)
    elif config.save_model:
        model_dir = run_dir / "model"
        to_save = merge_lora(tuned) if config.merge_lora else tuned
        with atomic_dir(model_dir) as tmp:
            to_save.save_pretrained(tmp)
            fault_point("train.save_model")  # weights in a temporary folder, not in place yet
            tokenizer.save_pretrained(tmp)
        if config.merge_lora:
            tuned = to_save
    metrics = {
        "method": config.method,
        "trainable_params": prepared.trainable,
        "total_params": prepared.total,
        "trainable_share": prepared.share,
        "optimizer_state_bytes": optimizer_state_bytes(trainer.method_optimizer),
        "train_seconds": seconds,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,  # fractional; under DDP counted on each process's shard
        "train_loss": output.training_loss,
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
        "loss_history": losses,
        "forgetless_version": __version__,
        "resumed": bool(resume),
        "device": str(trainer.args.device),
        "dtype": dtype_name(dtype),
        "monitor": [monitor.summary() for monitor in monitors],
        "update_analytics": analytics[0].summary() if analytics else None,
    }
    if mixed is not None:  # what the mix cost: examples and tokens per source
        metrics["mix"] = mixed.summary(trainer.state.global_step)
        print(f"[forgetless] {summary_line(metrics['mix'])}", flush=True)
    if prepared.distiller is not None:  # LwF's / KL's overhead: base copy and forward passes
        key = getattr(prepared.distiller, "name", "lwf")
        metrics[key] = prepared.distiller.summary(seconds)
        lwf = metrics[key]
        print(f"[forgetless] {key} overhead: base copy {lwf['base_bytes'] / 2**20:.0f} MiB, "
              f"base forward {lwf['base_forward_seconds']:.1f} s "
              f"({100 * lwf.get('time_share', 0.0):.0f}% of training)", flush=True)
    if prepared.method.ewc:  # the Fisher's source, size, cost and θ₀ + F memory
        metrics["ewc"] = prepared.regularizer.summary()
    if trainer.is_world_process_zero():
        fault_point("train.metrics")
        atomic_write_json(run_dir / "metrics.json", metrics)
    return TrainResult(config, run_dir, model_dir, metrics, losses, tuned, tokenizer)
