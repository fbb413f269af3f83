"""One-command GPU check: optimizer steps, training steps per method family, one evaluation pass.

    .venv/bin/python bench/gpu_check.py                      # on a CUDA machine: 1B shapes
    .venv/bin/python bench/gpu_check.py --device cpu --tiny  # the same code path, tiny shapes

Everything is built from a config with random weights (no Hub access needed): a
Llama-3.2-1B-like model (16 layers, hidden 2048, MLP 8192, 32 heads / 8 KV heads, vocabulary
128256, tied embeddings, ~1.24 B parameters) with the embedded SmolLM2 tokenizer (its ids fit in
the larger vocabulary). Three tables:

1. **optimizer step**: MoFO (``backend="torch"``, the path CUDA tensors take) vs fused
   ``torch.optim.AdamW`` on all of the model's parameter shapes, in bfloat16 and float32
   (median of ``--opt-repeats`` steps after two warm-up steps, synchronised);
2. **training**: ``--steps`` steps of ``forgetless.train.train`` per method family (full, attn,
   mlp-gate-up, lora, mofo, l2-anchor) in bfloat16 with float32 master weights (CUDA) or float32
   (CPU): tokens/s over the steps after the first (which pays allocation and kernel selection),
   the peak memory (``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS) and
   ``forgetless plan``'s prediction for the same shapes beside it;
3. **evaluation**: one ``forgetless.eval.evaluate`` pass (the count_letters target: generation +
   answer NLL, plus ARC-Easy/PIQA log-likelihood when the benchmark data is there).

Without a CUDA device (and without ``--device cpu``) it says so and exits 0: there is nothing to
measure. ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

METHODS = ("full", "attn", "mlp-gate-up", "lora", "mofo", "l2-anchor")


def llama_1b_config() -> LlamaConfig:
    """Llama-3.2-1B's shapes (public config values), short context."""
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                       num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2)


def tiny_config() -> LlamaConfig:
    """The same architecture at test size (the SmolLM2 tokenizer's vocabulary)."""
    return LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=2,
                       bos_token_id=1, eos_token_id=2)


def build(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights, initialised directly on ``device`` (CPU init of 1B weights is slow)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator counter, or the process's peak RSS (Linux)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # not Linux: the peak stays the process's
        Path("/proc/self/clear_refs").write_text("5")


def peak_bytes(device: torch.device) -> int | None:
    """Peak since ``reset_peak``: allocated CUDA bytes, or peak RSS on CPU (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gib(size: float | None) -> str:
    return "-" if size is None else f"{size / 2**30:.2f}"


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned table (also readable in a log file)."""
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title] + ["  ".join(c.rjust(w) if i else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


# --- 1. optimizer step ----------------------------------------------------------------------


def optimizer_steps(config: LlamaConfig, device: torch.device, repeats: int,
                    fraction: float) -> list[dict[str, Any]]:
    """Median step time of fused AdamW and MoFO (torch backend) on the model's shapes."""
    from forgetless import MoFO

    results = []
    for dtype in (torch.bfloat16, torch.float32):
        model = build(config, device, dtype)
        params = [p for p in model.parameters()]
        generator = torch.Generator(device=device).manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, device=device,
                                 dtype=dtype) * 1e-3
        for name in ("adamw-fused", "mofo-torch"):
            if name == "adamw-fused":
                optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)
            else:
                optimizer = MoFO(params, lr=1e-5, weight_decay=0.0, fraction=fraction,
                                 backend="torch")
            times = []
            for i in range(repeats + 2):
                synchronize(device)
                start = time.perf_counter()
                optimizer.step()
                synchronize(device)
                if i >= 2:  # the first steps allocate the state
                    times.append(time.perf_counter() - start)
            results.append({"dtype": str(dtype).removeprefix("torch."), "optimizer": name,
                            "params": sum(p.numel() for p in params),
                            "step_ms": 1000 * statistics.median(times)})
            del optimizer
            gc.collect()
        del model, params
        reset_peak(device)
    return results


# --- 2. training steps ----------------------------------------------------------------------


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer), synchronised."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._start = device, [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)


def train_steps(config: LlamaConfig, tokenizer, device: torch.device, dtype: torch.dtype,
                methods: list[str], steps: int, batch_size: int, max_length: int,
                gradient_checkpointing: bool, out: Path) -> tuple[list[dict[str, Any]], Any]:
    """``steps`` steps of ``forgetless.train.train`` per method; returns rows and the last
    tuned model (for the evaluation pass)."""
    from forgetless.data import build_dataset
    from forgetless.methods import parse_method
    from forgetless.plan import plan
    from forgetless.train import train

    limit = steps * batch_size * 40  # packed count_letters rows are short: plenty of blocks
    data = build_dataset(tokenizer, "count_letters", max_length, limit, 0, packing=True)
    tokens_per_sequence = statistics.mean(len(ids) for ids in data["input_ids"])
    planned = {m.method: m for m in plan(config, methods, batch_size=batch_size,
                                         max_length=max_length, dtype=dtype).methods}
    rows, tuned = [], None
    for method in methods:
        tuned = None
        reset_peak(device)
        model = build(config, device, dtype)
        timer = StepTimer(device)
        result = train(model=model, tokenizer=tokenizer, callbacks=[timer], method=method,
                       data="count_letters", limit=limit, packing=True, batch_size=batch_size,
                       max_length=max_length, max_steps=steps, learning_rate=1e-5,
                       logging_steps=1, report_to=[], save_model=False,
                       device=str(device), dtype=str(dtype).removeprefix("torch."),
                       gradient_checkpointing=gradient_checkpointing,
                       output_dir=str(out / method))
        peak = peak_bytes(device)
        timed = timer.times[1:] or timer.times
        one = planned[parse_method(method).name]
        predicted = (one.total_checkpointed_bytes if gradient_checkpointing
                     else one.total_bytes)
        rows.append({
            "method": method,
            "trainable_params": result.metrics["trainable_params"],
            "steps": result.metrics["steps"],
            "step_s": statistics.median(timed),
            "tokens_per_s": batch_size * tokens_per_sequence / statistics.median(timed),
            "peak_bytes": peak,
            "plan_total_bytes": predicted,
            "optimizer_state_bytes": result.metrics["optimizer_state_bytes"],
            "plan_optimizer_bytes": one.optimizer_bytes,
            "last_loss": result.metrics["last_loss"],
        })
        tuned = result.model
        del model, result
        if method != methods[-1]:
            tuned = None
            gc.collect()
    return rows, tuned


# --- 3. evaluation --------------------------------------------------------------------------


def evaluation_pass(model, tokenizer, limit: int) -> dict[str, Any]:
    """One evaluate() call: the count_letters target, plus the default held-out suite when
    its data is present (``FORGETLESS_DATA`` or ``../shared/data``)."""
    from forgetless.errors import ForgetlessError
    from forgetless.eval import DEFAULT_SUITE, evaluate
    from forgetless.paths import shared_data_dir

    try:
        shared_data_dir()
        suite = list(DEFAULT_SUITE)
    except ForgetlessError:
        suite = []
    start = time.perf_counter()
    result = evaluate(model, tokenizer, suite=suite, limit=limit, target="count_letters",
                      target_limit=limit, batch_size=16)
    seconds = time.perf_counter() - start
    items = limit * (len(suite) + 1)
    return {"suite": suite or ["(no benchmark data)"], "target": "count_letters",
            "items": items, "seconds": seconds, "items_per_s": items / seconds,
            "metrics": {k: round(v.value, 4) for k, v in result.metrics.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per method")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--opt-repeats", type=int, default=None)
    parser.add_argument("--fraction", type=float, default=0.1, help="MoFO fraction")
    parser.add_argument("--eval-limit", type=int, default=None, help="items per eval task")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--skip", default="", help="comma list of: optimizer,train,eval")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    if args.device in ("auto", "cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing "
              "to measure. `--device cpu --tiny` runs the same code path on CPU.")
        return 0
    device = torch.device("cpu" if args.device == "cpu" else "cuda")
    if device.type == "cpu" and not args.tiny:
        print("gpu_check: --device cpu needs --tiny (1B shapes on CPU take hours)",
              file=sys.stderr)
        return 2
    tiny = args.tiny
    steps = args.steps or (3 if tiny else 10)
    batch_size = args.batch_size or (2 if tiny else 4)
    max_length = args.max_length or (64 if tiny else 512)
    repeats = args.opt_repeats or (3 if tiny else 10)
    eval_limit = args.eval_limit or (4 if tiny else 50)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    config = tiny_config() if tiny else llama_1b_config()
    # bf16 + float32 master weights where the GPU supports it (train's default), else float32
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if cuda_bf16 else torch.float32

    from transformers import AutoTokenizer

    from forgetless.models import resolve_model

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check: {where}, torch {torch.__version__}, "
          f"{'tiny' if tiny else 'Llama-3.2-1B-like'} shapes, training dtype "
          f"{str(dtype).removeprefix('torch.')}, batch {batch_size} x {max_length}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    report: dict[str, Any] = {"device": where, "tiny": tiny, "torch": torch.__version__}
    outputs = []

    if "optimizer" not in skip:
        report["optimizer"] = optimizer_steps(config, device, repeats, args.fraction)
        base = {r["dtype"]: r["step_ms"] for r in report["optimizer"]
                if r["optimizer"] == "adamw-fused"}
        outputs.append(table(
            f"optimizer step, {report['optimizer'][0]['params']:,} parameters "
            f"(median of {repeats})",
            ["dtype", "optimizer", "step ms", "x fused AdamW"],
            [[r["dtype"], r["optimizer"], f"{r['step_ms']:.2f}",
              f"{r['step_ms'] / base[r['dtype']]:.2f}"] for r in report["optimizer"]]))
        print(outputs[-1], flush=True)

    tuned = None
    if "train" not in skip:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as out:
            rows, tuned = train_steps(config, tokenizer, device, dtype, methods, steps,
                                      batch_size, max_length, args.gradient_checkpointing,
                                      Path(out))
        report["train"] = rows
        memory = "peak alloc GiB" if device.type == "cuda" else "peak RSS GiB"
        outputs.append(table(
            f"training, {steps} steps each (tokens/s over steps 2..{steps})",
            ["method", "trainable", "step s", "tokens/s", memory, "plan GiB", "opt state ==",
             "last loss"],
            [[r["method"], f"{r['trainable_params']:,}", f"{r['step_s']:.3f}",
              f"{r['tokens_per_s']:.0f}", gib(r["peak_bytes"]), gib(r["plan_total_bytes"]),
              "yes" if r["optimizer_state_bytes"] == r["plan_optimizer_bytes"] else "NO",
              f"{r['last_loss']:.3f}"] for r in rows]))
        print(outputs[-1], flush=True)

    if "eval" not in skip:
        model = tuned if tuned is not None else build(config, device, dtype)
        report["eval"] = evaluation_pass(model.eval(), tokenizer, eval_limit)
        e = report["eval"]
        outputs.append(table("evaluation pass", ["suite + target", "items", "seconds", "items/s"],
                             [[", ".join([*e["suite"], e["target"]]), e["items"],
                               f"{e['seconds']:.1f}", f"{e['items_per_s']:.1f}"]]))
        print(outputs[-1], flush=True)

    print("\n" + "\n\n".join(outputs))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
