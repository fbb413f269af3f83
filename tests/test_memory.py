"""Memory and host-sync promises of the training step (issue 23): what autograd keeps alive
for the anchor penalty and the LwF term, and what the training loop makes the host wait for."""

from __future__ import annotations

import pytest
import torch

from forgetless.methods import prepare_model
from tiny_models import tiny_llama, tiny_model


def _saved_storages(fn):
    """Run ``fn`` under saved-tensor hooks; return its result and the storages autograd kept
    for the backward pass (data pointer and bytes of each saved tensor)."""
    saved = []

    def pack(tensor):
        saved.append((tensor.untyped_storage().data_ptr(), tensor.numel() * tensor.element_size()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, saved


@pytest.mark.parametrize("norm", [2, 1])
def test_anchor_penalty_keeps_no_full_size_temporary(norm):
    """Autograd saves only θ and θ₀ (which exist anyway), never a difference: ``(θ − θ₀).pow(2)``
    kept a full-size copy of every trainable tensor from forward to backward."""
    model = tiny_model("llama")
    prepared = prepare_model(model, f"l{norm}-anchor")
    penalty = prepared.regularizer
    with torch.no_grad():
        for param in penalty.params:
            param.add_(torch.randn_like(param) * 1e-2)
    held = {t.untyped_storage().data_ptr() for t in [*penalty.params, *penalty.anchors]}
    total, saved = _saved_storages(lambda: penalty(model))
    extra = [size for ptr, size in saved if ptr not in held and size > 64]
    assert saved and not extra, f"{len(extra)} temporaries saved, {sum(extra)} bytes"
    total.backward()
    for param, anchor in zip(penalty.params, penalty.anchors, strict=True):
        diff = param.detach() - anchor
        expected = 2 * diff if norm == 2 else diff.sign()
        torch.testing.assert_close(param.grad, penalty.weight * expected)
    expected = sum((p.detach() - a).pow(2).sum() if norm == 2 else (p.detach() - a).abs().sum()
                   for p, a in zip(penalty.params, penalty.anchors, strict=True))
    torch.testing.assert_close(total.detach(), penalty.weight * expected)


@pytest.mark.parametrize("method", ["full", "attn", "lora", "l2-anchor", "full+lwf"])
def test_adamw_methods_take_fused_adamw_on_cuda(method):
    """On CUDA every AdamW method gets fused AdamW (its CUDA tensors faked by FakeTensorMode: no
    GPU needed); on the CPU torch's own default (the single-tensor loop) stays."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    prepared = prepare_model(tiny_model("llama"), method)
    cpu = prepared.make_optimizer(lr=1e-3)
    assert not cpu.defaults["fused"] and not cpu.defaults["foreach"]
    with FakeTensorMode():
        prepared.model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cuda"))
        optimizer = prepared.make_optimizer(lr=1e-3, weight_decay=0.1)
    devices = {p.device.type for group in optimizer.param_groups for p in group["params"]}
    assert devices == {"cuda"} and optimizer.defaults["fused"] is True


def test_adamw_falls_back_to_foreach_where_fused_has_no_kernel(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from forgetless.methods import prepare as module

    real = torch.optim.AdamW

    def no_fused(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point")
        return real(*args, **kwargs)

    monkeypatch.setattr(module.torch.optim, "AdamW", no_fused)
    with FakeTensorMode():
        param = torch.nn.Parameter(torch.empty(4, 4, device="cuda"))
        optimizer = module.adamw([{"params": [param]}], lr=1e-3)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]


class _HostSyncs:
    """Counts the ops that make the host wait for the device: reading a value
    (``.item()``, ``bool(t)``, ``float(t)``: ``aten._local_scalar_dense``) and ``torch.equal``.

    Not counted (``model``): transformers' own check in the model's forward whether the
    attention mask has padding (``masking_utils``, one per forward, to skip building a mask).
    """

    def __init__(self) -> None:
        import traceback

        from torch.utils._python_dispatch import TorchDispatchMode

        waits = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default}
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in waits:
                    stack = traceback.extract_stack(limit=12)
                    if any(f.filename.endswith("masking_utils.py") for f in stack):
                        counter.model += 1
                    else:
                        counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count = self.model = 0
        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from forgetless.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


@pytest.mark.parametrize("method", ["full", "l2-anchor+lwf"])
def test_no_host_sync_per_micro_batch(tmp_path, tokenizer, method):
    """Host syncs per training run do not grow with the micro-batches: two optimizer steps of 1
    and of 4 micro-batches wait on the device equally often (the finite-loss check and the
    Trainer's NaN filter each read the loss once per micro-batch before)."""
    from forgetless.train import train

    counts = {}
    for accum in (1, 4):
        with _HostSyncs() as syncs:
            train(model=tiny_llama(), tokenizer=tokenizer, method=method, data="count_letters",
                  limit=16, batch_size=1, grad_accum=accum, max_steps=2, max_length=64,
                  logging_steps=1, learning_rate=1e-3, report_to=[], save_model=False,
                  output_dir=str(tmp_path / f"run{accum}"), device="cpu")
        counts[accum] = syncs.count
        assert syncs.model <= 4 * accum  # the model's forward: outside the training loop
    assert counts[4] == counts[1], counts


def test_non_finite_loss_stops_before_a_checkpoint_between_log_lines(tmp_path, tokenizer):
    """Checked where the Trainer syncs anyway: a non-finite loss between two log lines still
    stops the run at the next save (no checkpoint of NaN weights) and writes no metrics."""
    from forgetless import runs
    from forgetless.errors import ForgetlessError
    from forgetless.train import train

    with pytest.raises(ForgetlessError, match=r"training loss became (nan|inf) at step [12]:"):
        train(model=tiny_llama(), tokenizer=tokenizer, method="full", data="count_letters",
              limit=16, batch_size=4, max_steps=20, max_length=64, logging_steps=100,
              save_steps=3, learning_rate=1e12, max_grad_norm=0.0, report_to=[],
              output_dir=str(tmp_path / "run"), device="cpu")
    assert not runs.checkpoints(tmp_path / "run" / "trainer")
    assert not (tmp_path / "run" / "metrics.json").exists()


# torch APIs the code uses that are newer than some torch a user may have, with the release
# that made each public (torch's release notes); the pyproject floor must cover every one used.
_TORCH_API_SINCE = {
    "torch.accelerator": (2, 6),
    "torch.distributed.tensor": (2, 5),  # public DTensor (torch.distributed._tensor before)
    "torch.distributed.fsdp import fully_shard": (2, 6),  # FSDP2 public path
    "torch.nn.attention.flex_attention": (2, 5),
}


def test_torch_floor_in_pyproject_covers_the_apis_the_code_uses():
    """``torch>=2.4`` was too low: ``optim/distributed.py`` imports torch.distributed.tensor
    (2.5) and calls torch.accelerator (2.6), so every ``+mofo`` method failed on 2.4."""
    import re
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).parents[1]
    dependencies = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in dependencies if Requirement(d).name == "torch")
    floors = [s.version for s in torch_req.specifier if s.operator == ">="]
    assert len(floors) == 1, torch_req
    floor = tuple(int(part) for part in floors[0].split(".")[:2])
    source = "\n".join(p.read_text() for p in (root / "src" / "forgetless").rglob("*.py"))
    used = {api: since for api, since in _TORCH_API_SINCE.items()
            if re.search(re.escape(api) + r"\b", source)}
    assert "torch.accelerator" in used and "torch.distributed.tensor" in used  # the scan works
    too_new = {api: since for api, since in used.items() if since > floor}
    assert not too_new, f"pyproject says torch>={floors[0]} but the code uses {too_new}"
    import torch.accelerator  # noqa: F401 - the installed torch has what the floor promises
    import torch.distributed.tensor  # noqa: F401


def _reference_kl(logits, base_logits, mask, count):
    """The unchunked formula LwF used before: float32 log-softmaxes of the whole batch."""
    import torch.nn.functional as F

    base_logp = F.log_softmax(base_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    per_position = (base_logp.exp() * (base_logp - logp)).sum(-1) * mask.float()
    return per_position.sum() / count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_lwf_kl_equals_the_unchunked_formula(dtype):
    from forgetless.methods.lwf import kl_to_base

    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 7, 11)).to(dtype).requires_grad_()
    base = (3 * torch.randn(2, 7, 11)).to(dtype)
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    count = mask.sum()
    expected = _reference_kl(logits, base, mask, count)
    (want,) = torch.autograd.grad(expected, logits)
    for rows in (1, 3, 14, None):  # chunks that cut rows, one chunk, the default
        got = kl_to_base(logits, base, mask / count, rows)
        (grad,) = torch.autograd.grad(got, logits)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
        tolerance = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else {}
        torch.testing.assert_close(grad, want, **tolerance)


def test_lwf_term_keeps_one_logits_sized_tensor_for_backward():
    """Autograd keeps only the gradient (logits' size and dtype) for the LwF term: the unchunked
    formula kept three batch × length × vocab float32 tensors (and made more while running)."""
    model = tiny_model("llama")
    prepared = prepare_model(model, "full+lwf")
    ids = torch.randint(0, 64, (2, 9))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    logits = model(**inputs).logits
    kl, saved = _saved_storages(lambda: prepared.distiller(logits, inputs))
    size = logits.numel() * logits.element_size()
    assert [s for _, s in saved if s > 64] == [size]
    kl.backward()
    reference = _reference_kl(logits, prepared.distiller.base(**inputs).logits,
                              inputs["attention_mask"], ids.numel())
    torch.testing.assert_close(kl, prepared.distiller.weight * reference)


@pytest.mark.parametrize("launch", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
@pytest.mark.parametrize("method", ["l2-anchor", "l1-anchor+mofo", "attn+lwf", "lwf"])
def test_anchor_and_lwf_methods_are_refused_under_fsdp_and_deepspeed(monkeypatch, launch,
                                                                     method):
    """Under FSDP2 the penalty read abandoned parameters (0) and ZeRO-3 failed at step 1:
    refused before a model loads (the model name here does not even exist), and in a compare
    or continual plan before anything trains (check_training_sets)."""
    from forgetless.config import TrainConfig
    from forgetless.errors import ForgetlessError
    from forgetless.train import check_launch, check_training_sets, train

    check_launch(method)  # one process: fine
    monkeypatch.setenv(launch, "true")  # what accelerate launch sets for an FSDP / DS config
    with pytest.raises(ForgetlessError, match=r"supported in one process and under DDP"):
        train(model="no/such-model-folder", method=method, data="count_letters")
    with pytest.raises(ForgetlessError, match=method.split("+")[0]):
        check_training_sets(None, [TrainConfig(method="full"), TrainConfig(method=method)])
    check_launch("full+mofo")  # methods without those terms still run sharded


def test_cli_refuses_an_anchor_method_under_deepspeed_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true"}
    done = subprocess.run(
        [sys.executable, "-m", "forgetless", "train", "method=l2-anchor", "model=smollm2-135m",
         "data=count_letters", f"output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("forgetless: error: method 'l2-anchor'")
    assert "DDP" in lines[0] and not (tmp_path / "run" / "metrics.json").exists()


def test_plan_counts_what_lwf_and_anchors_hold_beyond_the_model():
    """``method_activation_bytes``: at least LwF's saved gradient plus the base's logits of the
    same batch (measured here with saved-tensor hooks), and two temporaries of the largest
    anchored tensor; 0 for a method without such a term. Totals are checked against real peaks
    by bench/plan_vs_real.py (docs/gpu.md)."""
    from forgetless.plan import plan

    model = tiny_model("llama")
    batch, length = 2, 9
    planned = {m.method: m for m in plan(model.config, ["full", "l2-anchor", "full+lwf"],
                                         batch_size=batch, max_length=length,
                                         dtype="float32").methods}
    assert planned["full"].method_activation_bytes == 0
    prepared = prepare_model(model, "full+lwf")
    ids = torch.randint(0, 64, (batch, length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    logits = model(**inputs).logits
    _, saved = _saved_storages(lambda: prepared.distiller(logits, inputs))
    base_logits = logits.numel() * logits.element_size()
    lwf = planned["full+lwf"]
    assert lwf.method_activation_bytes >= sum(size for _, size in saved) + base_logits
    assert lwf.activation_bytes - lwf.method_activation_bytes == (
        planned["full"].activation_bytes)
    largest = max(p.numel() * 4 for p in model.parameters())
    assert planned["l2-anchor"].method_activation_bytes == 2 * largest
