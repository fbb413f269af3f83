"""``forgetless plan``: how much memory each method needs, from the model's config alone.

Choosing a method is often choosing what fits on the GPU at hand, and finding out by an
out-of-memory error after a model has loaded for minutes is the slow way. ``plan`` builds the
model on the ``meta`` device (shapes and dtypes, no storage, no weights read) and applies the
*same* preparation ``train`` applies (``methods.prepare_model``: the freezing, the LoRA wrapping
by PEFT, the anchor copy; then ``train``'s float32 master-weight cast), so the trainable counts
and every byte that follows from them are exact, not a rule of thumb:

* ``weights_bytes``: parameters and buffers as they sit during training, i.e. frozen weights
  in the run's dtype and, with a half dtype and ``fp32_master_weights``, the trainable ones in
  float32 (``train`` casts them in place; there is no second half copy);
* ``grads_bytes``: one gradient per trainable parameter, in the parameter's dtype;
* ``optimizer_bytes``: AdamW's state, which MoFO keeps too (``exp_avg`` and ``exp_avg_sq``
  shaped and typed like the parameter, and a float32 scalar ``step`` per tensor): exactly what
  ``train`` reports as ``optimizer_state_bytes`` (tested);
* ``anchor_bytes``: the frozen θ₀ copy of the trainable parameters that ``l1``/``l2-anchor``
  keep (in the parameters' dtype once the penalty has run), for ``+ewc`` the same θ₀ and its
  diagonal Fisher F (two copies), plus, for ``+lwf`` / ``+kl``, the frozen copy of the whole
  base model (weights and buffers) its KL term runs;
* ``autocast_bytes``: under a half dtype with float32 masters, autocast's half copy of each
  trainable weight, held from the forward pass until the backward pass has used it;
* ``analytics_bytes``: what the parameter-update analytics (on by default,
  ``update_stats_every``) keep: θ₀ and a pre-step snapshot of the tracked coordinates, a bool
  each and a sampled tensor's int64 indices (``updates.analytics_bytes``; 9 bytes per float32
  trainable parameter when ``update_stats_sample`` is null, at most ~1 MiB per tensor by
  default);
* ``activation_bytes`` / ``activation_checkpointed_bytes``: an *estimate* (see
  ``activation_estimate``), the only number here that is not exact; both include
  ``method_activation_bytes``, what a method's own loss term holds on top of the model's
  activations (``method_activation_estimate``: LwF's logits-sized gradient and the base's
  logits, the anchor penalty's transient difference), which checkpointing does not shrink.

``total_bytes`` adds them all (activations without checkpointing), except that with one
micro-batch per step it counts only the larger of the gradients and the activations (with
the output layer's gradient), which do not peak together (``plan``'s ``grad_accum``);
``total_checkpointed_bytes`` the same with ``gradient_checkpointing``. Not counted: the CUDA
context and the allocator's caching/fragmentation, the data, and temporary buffers of kernels,
so keep some headroom (``bench/plan_vs_real.py`` compares with real runs; docs/gpu.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgetless.config import UPDATE_STATS_SAMPLE as DEFAULT_SAMPLE
from forgetless.config import TrainConfig
from forgetless.devices import DTYPES, check_attn_implementation, dtype_name
from forgetless.errors import ForgetlessError
from forgetless.methods import parse_method, prepare_model
from forgetless.methods.layout import find_projections
from forgetless.methods.lwf import chunk_rows
from forgetless.methods.options import method_options
from forgetless.models import resolve_model
from forgetless.train import cast_trainable
from forgetless.updates import analytics_bytes

DEFAULT_METHODS = ("full", "attn", "attn-qkv", "mlp", "mlp-gate-up", "lora", "mofo",
                   "attn+mofo", "l2-anchor")
# torch.optim.AdamW keeps ``step`` as a float32 scalar tensor per parameter (also when fused or
# capturable, then on the GPU); MoFO names and types its state the same way.
STEP_BYTES = 4
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
          "tib": 2**40}
NOTE = ("other = anchor copy + autocast half copies + update analytics; activations are an "
        "estimate (forgetless.plan.activation_estimate); not counted: CUDA context, allocator "
        "caching, data")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$")


def parse_size(text: str) -> int:
    """``"24GiB"`` → bytes. GiB/MiB/… are powers of 2, GB/MB/… powers of 10, and a bare ``G``
    means GiB (as ``nvidia-smi`` and GPU data sheets count); a plain number is bytes."""
    match = _SIZE.match(str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise ForgetlessError(f"--gpu-mem '{text}' is not a size like 24GiB, 80GB or 16G")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value <= 0:
        raise ForgetlessError(f"--gpu-mem '{text}' must be more than 0 bytes")
    return int(value)


def human(size: float) -> str:
    """Bytes as a short binary-unit string (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} TiB"  # pragma: no cover - the loop returns at GiB


@dataclass
class MethodPlan:
    """The memory of one method; ``*_bytes`` as described in the module docstring."""

    method: str
    trainable_params: int
    total_params: int
    trainable_tensors: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    anchor_bytes: int
    autocast_bytes: int
    analytics_bytes: int
    activation_bytes: int
    activation_checkpointed_bytes: int
    method_activation_bytes: int
    total_bytes: int
    total_checkpointed_bytes: int
    fits: bool | None = None
    fits_checkpointed: bool | None = None


@dataclass
class Plan:
    """Every method's plan for one model and batch shape."""

    model: str
    architecture: str
    dtype: str
    master_dtype: str
    batch_size: int
    max_length: int
    attn_implementation: str
    gpu_mem_bytes: int | None
    methods: list[MethodPlan] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """A plain-text table (the CLI prints a rich one when rich is installed)."""
        header, rows = self._rows()
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [self.title(), "  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                            enumerate(zip(row, widths))) for row in rows]
        return "\n".join(lines)

    def title(self) -> str:
        precision = self.dtype + (f" ({self.master_dtype} master weights)"
                                  if self.master_dtype != self.dtype else "")
        budget = f", GPU memory {human(self.gpu_mem_bytes)}" if self.gpu_mem_bytes else ""
        return (f"{self.model} ({self.architecture}), {precision}, batch {self.batch_size} x "
                f"{self.max_length} tokens, {self.attn_implementation}{budget}")

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["method", "trainable", "weights", "grads", "optimizer", "other",
                  "activations", "total", "act. (ckpt)", "total (ckpt)"]
        if self.gpu_mem_bytes:
            header += ["fits", "fits (ckpt)"]
        rows = []
        for m in self.methods:
            row = [m.method, f"{m.trainable_params:,}", human(m.weights_bytes),
                   human(m.grads_bytes), human(m.optimizer_bytes),
                   human(m.anchor_bytes + m.autocast_bytes + m.analytics_bytes),
                   human(m.activation_bytes),
                   human(m.total_bytes), human(m.activation_checkpointed_bytes),
                   human(m.total_checkpointed_bytes)]
            if self.gpu_mem_bytes:
                row += ["yes" if m.fits else "no", "yes" if m.fits_checkpointed else "no"]
            rows.append(row)
        return header, rows

    def print(self) -> None:
        """The table: rich on a terminal, plain text when piped (or without rich)."""
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # pragma: no cover - rich is a dependency
            Console = None  # noqa: N806
        console = Console() if Console is not None else None
        if console is None or not console.is_terminal:  # piped: rich would squeeze to 80 cols
            print(self.table() + "\n" + NOTE)
            return
        header, rows = self._rows()
        table = Table(title=self.title(), title_justify="left")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        print(NOTE)


def load_config(model: str):
    """The transformers config of ``model`` (alias, folder, .gguf, config .json file, Hub id),
    without loading weights."""
    from transformers import AutoConfig

    path = Path(model).expanduser()
    source = str(path) if path.suffix == ".json" and path.is_file() else resolve_model(model)
    if (Path(source) / "adapter_config.json").is_file():
        raise ForgetlessError(f"plan: {model} is a LoRA adapter; plan its base model")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ForgetlessError(f"plan: cannot read the config of '{model}': "
                              f"{str(err).splitlines()[0]}") from None


def meta_model(config, dtype: torch.dtype):
    """The model of ``config`` on the meta device: real shapes and dtypes, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError:  # vision-language configs map to an image-text-to-text class
            from transformers import AutoModelForImageTextToText

            try:
                return AutoModelForImageTextToText.from_config(config, dtype=dtype)
            except ValueError as err:
                raise ForgetlessError(f"plan: no causal LM class for {type(config).__name__}: "
                                      f"{str(err).splitlines()[0]}") from None


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _dims(config) -> dict[str, int]:
    """Sizes of the language model the activation estimate needs (text config of a VLM)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    inner = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
    return dict(layers=int(text.num_hidden_layers), hidden=hidden, heads=heads,
                q=heads * head_dim, kv=kv_heads * head_dim,
                intermediate=int(inner or 4 * hidden), vocab=int(text.vocab_size))


# Tensors of a decoder layer that only a weight's gradient needs (per token: h, h, h, i values),
# so a layer whose weights there are frozen does not keep them (``unsaved_inputs``).
_WEIGHT_ONLY = ("attn_input", "attn_output", "mlp_input", "mlp_product")


def unsaved_inputs(model, method: str) -> tuple[str, ...]:
    """Which of ``_WEIGHT_ONLY`` a prepared model's backward pass does not need: a linear layer
    keeps its input for its own weight's gradient (or its LoRA adapter's), and a norm its output
    for its scale's; frozen ones need neither. Unknown layouts count as training (over-count)."""

    modules = dict(model.named_modules())

    def trains(roles: set[str]) -> bool:
        try:
            names = find_projections(model, frozenset(roles), method)
        except ForgetlessError:
            return True
        return any(p.requires_grad for name in names for p in modules[name].parameters())

    norms = any(p.requires_grad for name, p in model.named_parameters()
                if "norm" in name or ".ln_" in name)
    kept = {"attn_input": norms or trains({"q", "k", "v"}), "attn_output": trains({"o"}),
            "mlp_input": norms or trains({"gate", "up"}), "mlp_product": trains({"down"})}
    return tuple(name for name in _WEIGHT_ONLY if not kept[name])


def activation_estimate(config, batch_size: int, max_length: int, compute_bytes: int,
                        attn_implementation: str = "sdpa",
                        unsaved: tuple[str, ...] = ()) -> tuple[int, int]:
    """Bytes of activations kept for the backward pass, ``(without, with)`` checkpointing.

    Per decoder layer and token, a Llama-style layer saves for backward (in the compute dtype,
    ``compute_bytes``): its input and the attention norm's output (2h), the query, key and value
    (q + 2kv), the attention output (h), the residual after attention and the MLP norm's output
    (2h), and gate, activation, up and their product (4i): ``6h + q + 2kv + 4i`` values
    (GPT-2-style MLPs without a gate are counted the same, a slight over-estimate). ``eager``
    attention also keeps its probabilities, ``heads * s`` per token; ``sdpa``/flash kernels
    keep only a per-row log-sum-exp (ignored). On top, once per batch: the final norm's input
    (h) and the vocabulary-sized tensors around the loss, ``(12 + c) * V`` per token when the
    compute dtype is half (logits, their float32 copy, log-softmax and its gradient in float32)
    and ``12 * V`` in float32.

    With gradient checkpointing (one checkpoint per decoder layer, as transformers does) only
    each layer's input (h per token) stays, plus one layer's full set while it is recomputed.

    ``unsaved`` (``unsaved_inputs``) removes what frozen weights need not keep: the attention
    and MLP norms' outputs and the attention output (h each), the MLP product (i).

    Not counted: transient buffers inside kernels, dropout masks.
    """
    d = _dims(config)
    tokens = batch_size * max_length
    per_layer = 6 * d["hidden"] + d["q"] + 2 * d["kv"] + 4 * d["intermediate"]
    per_layer -= sum(d["intermediate"] if name == "mlp_product" else d["hidden"]
                     for name in unsaved)
    if attn_implementation == "eager":
        per_layer += d["heads"] * max_length
    loss = (12 + (compute_bytes if compute_bytes != 4 else 0)) * d["vocab"]
    head = tokens * (d["hidden"] * compute_bytes + loss)
    full = tokens * per_layer * compute_bytes * d["layers"] + head
    checkpointed = (tokens * d["hidden"] * compute_bytes * d["layers"]
                    + tokens * per_layer * compute_bytes + head)
    return full, checkpointed


def method_activation_estimate(config, prepared, batch_size: int, max_length: int,
                               compute_bytes: int) -> int:
    """Bytes a method's own loss term holds at the peak, beyond the model's activations.

    ``+lwf`` (``methods.lwf``): the gradient with respect to the logits, saved from the KL's
    forward to the backward pass, and the base's logits during that forward, each batch ×
    length × vocab in the compute dtype; plus one chunk's float32 temporaries (about six of
    ``CHUNK_ELEMENTS``). Anchors (``methods.anchor``): autograd keeps only θ and θ₀ (counted in
    ``anchor_bytes``), but computing a term makes up to two temporaries the size of that tensor,
    counted for the largest trainable tensor.
    """
    held = 0
    if prepared.distiller is not None:
        vocab = _dims(config)["vocab"]
        tokens = batch_size * max_length
        held += 2 * tokens * vocab * compute_bytes
        held += 6 * min(tokens, chunk_rows(vocab)) * vocab * 4
    if prepared.regularizer is not None and prepared.regularizer.params:
        held += 2 * max(_bytes([p]) for p in prepared.regularizer.params)
    return held


def plan_method(config, method: str, dtype: torch.dtype, master: torch.dtype,
                batch_size: int, max_length: int, attn_implementation: str = "sdpa",
                options: Any = None, update_stats: bool = True,
                update_stats_sample: int | None = DEFAULT_SAMPLE,
                grad_accum: int = 1) -> MethodPlan:
    """One method on a fresh meta model of ``config``, prepared exactly as ``train`` does."""

    model = meta_model(config, dtype)
    with torch.device("meta"):  # LoRA layers and the anchor copy land on meta too
        prepared = prepare_model(model, method, options)
    if master != dtype:
        cast_trainable(prepared.model, master)
    params = list(prepared.model.parameters())  # unique: tied weights count once
    trainable = [p for p in params if p.requires_grad]
    weights = _bytes(params) + _bytes(prepared.model.buffers())
    grads = _bytes(trainable)
    optimizer = 2 * _bytes(trainable) + STEP_BYTES * len(trainable)
    anchor = _bytes(prepared.regularizer.params) if prepared.regularizer is not None else 0
    if prepared.method.ewc:  # +ewc keeps its Fisher F beside θ₀, one more copy
        anchor *= 2
    if prepared.distiller is not None:  # +lwf / +kl: a frozen copy of the whole base
        anchor += prepared.distiller.base_bytes
    half = torch.tensor([], dtype=dtype).element_size()
    autocast = sum(p.numel() for p in trainable if p.ndim >= 2) * half if master != dtype else 0
    activations, checkpointed = activation_estimate(
        config, batch_size, max_length, half, attn_implementation,
        unsaved_inputs(prepared.model, prepared.method.name))
    own = method_activation_estimate(config, prepared, batch_size, max_length, half)
    activations, checkpointed = activations + own, checkpointed + own
    analytics = analytics_bytes(trainable, update_stats_sample) if update_stats else 0
    fixed = weights + optimizer + anchor + autocast + analytics
    if grad_accum == 1:  # gradients and activations do not peak together (see ``plan``)
        head = prepared.model.get_output_embeddings()
        first = _bytes([head.weight]) if head is not None and head.weight.requires_grad else 0
        peak, peak_checkpointed = (max(grads, act + first) for act in (activations,
                                                                       checkpointed))
    else:  # the gradients of earlier micro-batches are there while activations peak
        peak, peak_checkpointed = grads + activations, grads + checkpointed
    return MethodPlan(
        method=prepared.method.name, trainable_params=prepared.trainable,
        total_params=prepared.total, trainable_tensors=len(trainable), weights_bytes=weights,
        grads_bytes=grads, optimizer_bytes=optimizer, anchor_bytes=anchor,
        autocast_bytes=autocast, analytics_bytes=analytics, activation_bytes=activations,
        activation_checkpointed_bytes=checkpointed, method_activation_bytes=own,
        total_bytes=fixed + peak, total_checkpointed_bytes=fixed + peak_checkpointed,
    )


def plan(
    model: str | Any = "smollm2-135m",
    methods: Sequence[str] | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    dtype: str | torch.dtype = "auto",
    fp32_master_weights: bool = True,
    attn_implementation: str = "sdpa",
    gpu_mem: int | str | None = None,
    options: Any = None,
    update_stats: bool = True,
    update_stats_sample: int | None = DEFAULT_SAMPLE,
    grad_accum: int = 1,
) -> Plan:
    """Plan the memory of each of ``methods`` for ``model`` at ``batch_size`` x ``max_length``.

    ``model`` is a name as for ``load_config`` or a transformers config object.

    ``dtype`` as in ``TrainConfig``, except that ``auto`` means bfloat16 here: a plan is for
    the GPU, where ``train`` picks bfloat16. ``options`` is a ``methods.MethodOptions``
    (LoRA rank, …); ``gpu_mem`` (bytes or ``"24GiB"``) fills in ``fits``;
    ``update_stats`` whether the update analytics run (``TrainConfig.update_stats_every`` set,
    the default), ``update_stats_sample`` as in ``TrainConfig`` (None = every coordinate).

    ``grad_accum`` 1 (the default): the Trainer frees the gradients after each step, so they
    do not peak with the activations: the activations peak as the backward pass starts (with
    the output layer's gradient, computed first), the gradients at its end when most
    activations are freed; the total counts the larger. With more micro-batches per step the
    earlier micro-batches' gradients are there at the activation peak: both are added.
    """

    methods = list(methods or DEFAULT_METHODS)
    for name in methods:
        parse_method(name)  # an unknown name lists the valid ones before any work
    if grad_accum < 1:
        raise ForgetlessError("plan: --grad-accum must be at least 1")
    if batch_size < 1 or max_length < 1:
        raise ForgetlessError("plan: --batch-size and --max-length must be at least 1")
    if attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
        check_attn_implementation(attn_implementation)  # the one-line error with the choices
    if isinstance(dtype, str):
        if dtype != "auto" and dtype not in DTYPES:
            raise ForgetlessError(f"dtype '{dtype}' is not one of auto, {', '.join(DTYPES)}")
        dtype = torch.bfloat16 if dtype == "auto" else DTYPES[dtype]
    if dtype == torch.float16 and not fp32_master_weights:
        raise ForgetlessError("dtype float16 needs fp32_master_weights (as train does)")
    half = dtype in (torch.bfloat16, torch.float16)
    master = torch.float32 if half and fp32_master_weights else dtype
    budget = parse_size(gpu_mem) if isinstance(gpu_mem, str) else gpu_mem
    if options is None:
        options = method_options(TrainConfig())
    config = load_config(model) if isinstance(model, str | Path) else model
    name = str(model) if isinstance(model, str | Path) else type(model).__name__
    result = Plan(model=name, architecture=type(config).__name__.removesuffix("Config"),
                  dtype=dtype_name(dtype), master_dtype=dtype_name(master), batch_size=batch_size,
                  max_length=max_length, attn_implementation=attn_implementation,
                  gpu_mem_bytes=budget)
    for name in methods:
        one = plan_method(config, name, dtype, master, batch_size, max_length,
                          attn_implementation, options, update_stats, update_stats_sample,
                          grad_accum)
        if budget:
            one.fits = one.total_bytes <= budget
            one.fits_checkpointed = one.total_checkpointed_bytes <= budget
        result.methods.append(one)
    return result
