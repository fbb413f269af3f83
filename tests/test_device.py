"""Device correctness without a GPU: the model lives on the ``meta`` device and a dispatch mode
watches every aten op, failing on any op that mixes a host (CPU) tensor with the model's device.

On a real GPU such an op either fails ("Expected all tensors to be on the same device") or, for
indexing with a CPU index, silently copies to the device every call; on ``meta`` it would pass
unnoticed, so ``DeviceGuard`` makes both a test failure. Meta tensors hold no values, so the
guard also answers the few questions code asks about values (``.item()``, ``bool()``,
``.tolist()``/``.cpu()``) with zeros - the numbers are meaningless, the device flow is what is
tested. Transfers (``.to(device)``, ``copy_``) are the legitimate way across and are allowed.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from test_eval_helpers import char_tokenizer
from tiny_models import tiny_model

# Ops that move data between devices on purpose.
_TRANSFERS = ("aten.to.", "aten._to_copy.", "aten.copy_.", "aten._copy_from", "aten.lift_fresh")
_SCALARS = ("aten.item.", "aten._local_scalar_dense.", "aten.is_nonzero.")


class DeviceGuard(TorchDispatchMode):
    """Fails an op that mixes ``device`` tensors with non-scalar CPU tensors; fakes values."""

    def __init__(self, device: str = "meta") -> None:
        super().__init__()
        self.device = device
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if t.device.type == self.device]
        host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]  # CPU scalars are
        if on_device and host and not name.startswith(_TRANSFERS):  # allowed on CUDA too
            where = ", ".join(f"{t.device.type}{tuple(t.shape)}" for t in tensors)
            self.mixed.append(f"{name}({where})")
            raise AssertionError(f"op {name} mixes CPU and {self.device} tensors: {where}")
        if on_device and name.startswith(_SCALARS):
            return True if on_device[0].dtype == torch.bool else 0
        if on_device and name.startswith(("aten.to.", "aten._to_copy.")):
            target = kwargs.get("device") or next(
                (a for a in args[1:] if isinstance(a, torch.device | str)), None)
            if target is not None and torch.device(target).type == "cpu":
                dtype = kwargs.get("dtype") or next(
                    (a for a in args[1:] if isinstance(a, torch.dtype)), on_device[0].dtype)
                return torch.zeros(on_device[0].shape, dtype=dtype)
        if name.startswith("aten.copy_.") and args[0].device.type == "cpu" and on_device:
            return args[0].zero_()
        return func(*args, **kwargs)


def meta_model(arch: str = "llama", seed: int = 0):
    with torch.device("meta"):
        return tiny_model(arch, seed)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def guarded(fn, *args, **kwargs):
    with DeviceGuard() as guard:
        out = fn(*args, **kwargs)
    assert not guard.mixed, guard.mixed  # also when library code swallowed the AssertionError
    return out


def test_the_guard_fails_on_a_cpu_input():
    model = meta_model()
    with pytest.raises(AssertionError, match="mixes CPU and meta"), DeviceGuard():
        model(input_ids=torch.tensor([[1, 5, 9]]))
    guarded(model, input_ids=torch.tensor([[1, 5, 9]], device="meta"))


REQUESTS = [("Question: why?\nAnswer:", " because"), ("Question: why?\nAnswer:", " because of"),
            ("Q: x", " y"), ("Q: x", " z"), ("x", " one-token context")]


@pytest.mark.parametrize("share_context", [True, False])
def test_scoring_on_the_model_device(tokenizer, share_context):
    from forgetless.eval.scoring import score_requests

    scores = guarded(score_requests, meta_model(), tokenizer, REQUESTS, batch_size=2,
                     share_context=share_context)
    assert len(scores) == len(REQUESTS)


def _rows():
    from forgetless.eval.targets import TargetRow

    return [TargetRow(str(i), [{"role": "user", "content": q}], a, a)
            for i, (q, a) in enumerate([("1+1?", "2"), ("a longer question?", "10"),
                                        ("x?", "3")])]


def test_generation_and_answer_nll_on_the_model_device(tokenizer):
    from forgetless.eval.targets import answer_nll, generate_greedy

    model = meta_model()
    outputs = guarded(generate_greedy, model, tokenizer, _rows(), max_new_tokens=4, batch_size=2)
    assert len(outputs) == 3
    assert len(guarded(answer_nll, model, tokenizer, _rows(), batch_size=2)) == 3


PROMPTS = ["The cat sat on the mat.", "Two plus two is", "A much longer prompt, to pad the batch."]


def test_drift_on_the_model_device(tokenizer):
    from forgetless.eval.drift import kl_and_number_mass, param_drift

    model, base = meta_model(), meta_model(seed=1)
    metrics = guarded(kl_and_number_mass, model, base, tokenizer, PROMPTS, batch_size=2)
    assert {"kl", "top1_agreement", "number_mass"} <= metrics.keys()
    host_base = tiny_model("llama", seed=1)  # a base elsewhere: its logits come to the model
    guarded(kl_and_number_mass, model, host_base, tokenizer, PROMPTS, batch_size=2)
    drift = guarded(param_drift, model, host_base)  # compared on the parameter's device
    assert drift.rows and drift.total["numel"] > 0


def test_monitor_measures_on_the_model_device(tokenizer):
    from forgetless.monitor import ForgettingMonitor

    monitor = ForgettingMonitor(every=1, prompts=PROMPTS, base_model=meta_model(seed=1),
                                tokenizer=tokenizer)
    values = guarded(monitor.measure, meta_model())
    assert "forgetting/kl" in values and "forgetting/number_mass_gain" in values


def test_evaluate_target_and_drift_on_the_model_device(tokenizer):
    from forgetless.eval import Target, evaluate

    target = Target("device_sums", load=_rows, max_new_tokens=3)
    result = guarded(evaluate, meta_model(), tokenizer, suite=[], target=target,
                     base_model=meta_model(seed=1), drift_prompts=PROMPTS, batch_size=2)
    assert "device_sums/exact_match" in result.metrics and "drift/kl" in result.metrics


def test_interpolation_and_anchor_on_the_parameters_device():
    from forgetless.interpolate import interpolate
    from forgetless.methods.anchor import AnchorPenalty

    base, tuned = meta_model(), tiny_model("llama", seed=1)  # the tuned one on the host
    mixed = guarded(interpolate, base, tuned, 0.5)
    assert all(p.device.type == "meta" for p in mixed.parameters())
    host = [p for p in tiny_model("llama").parameters()][:3]
    penalty = AnchorPenalty(host, weight=0.1)  # anchors taken on the host ...
    penalty.params = [p for p in meta_model().parameters()][:3]  # ... the weights moved
    assert guarded(penalty).device.type == "meta"


# --- the device setting ------------------------------------------------------------------------


def test_device_and_dtype_resolve_or_fail_in_one_line(monkeypatch):
    from forgetless.config import TrainConfig, load_config
    from forgetless.devices import resolve_device, resolve_dtype
    from forgetless.errors import ForgetlessError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    assert os.environ["DS_ACCELERATOR"] == "cpu"  # DeepSpeed's "unable to detect" warning
    assert resolve_dtype("auto", "cpu") == torch.float32  # bf16 only on a CUDA device
    assert resolve_dtype("bfloat16") == torch.bfloat16
    for bad, message in [("cuda", "no CUDA device"), ("cuda:1", "no CUDA device"),
                         ("gpu", "not one of auto")]:
        with pytest.raises(ForgetlessError, match=message):
            resolve_device(bad)
    with pytest.raises(ForgetlessError, match="not one of auto"):
        load_config(TrainConfig, None, ["device=gpu0"])
    with pytest.raises(ForgetlessError, match="bad value for 'dtype'"):
        load_config(TrainConfig, None, ["dtype=fp8"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ForgetlessError, match="only 2 CUDA"):
        resolve_device("cuda:2")


def test_trainer_placement_and_precision_follow_the_settings(tmp_path):
    from forgetless.config import TrainConfig
    from forgetless.train import _training_arguments

    config = TrainConfig(report_to=[], gradient_checkpointing=True)
    args = _training_arguments(config, tmp_path, torch.device("cpu"), torch.bfloat16)
    assert args.use_cpu and args.bf16 and not args.fp16
    checkpointing = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    kwargs = (getattr(args, "activation_checkpointing_kwargs", None)
              or args.gradient_checkpointing_kwargs)
    assert checkpointing and kwargs == {"use_reentrant": False}
    on_gpu = _training_arguments(TrainConfig(report_to=[]), tmp_path, torch.device("cuda", 0))
    assert not on_gpu.use_cpu and not on_gpu.bf16  # not hard-wired to torch.cuda.is_available()


def test_a_missing_gpu_fails_before_a_model_loads(tmp_path, monkeypatch):
    from forgetless import check, train
    from forgetless.errors import ForgetlessError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("forgetless.train.load_model", no_load)
    with pytest.raises(ForgetlessError, match="no CUDA device"):
        train.train(device="cuda", output_dir=str(tmp_path / "run"), report_to=[])
    assert not (tmp_path / "run").exists()
    with pytest.raises(ForgetlessError, match="no CUDA device"):
        check.check("a-model", "a-base", device="cuda:0")


def test_eval_cli_device_error_is_one_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "forgetless", "eval", "--suite", "none",
                           "--target", "gsm8k", "--device", "gpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "forgetless: error: device 'gpu' is not one of auto (CUDA when available, else CPU), "
        "cpu, cuda or cuda:N"]


def test_compare_shares_device_and_dtype_and_keeps_old_hashes(monkeypatch):
    from forgetless import compare, runs
    from forgetless.errors import ForgetlessError
    from forgetless.jobs.identity import COMPARE_UNHASHED, LATER_KEYS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto = float32 on the CPU

    plan = compare.plan_methods(compare.load_compare_config(None, ["methods=[attn]"]))[0]
    new = {"device", "dtype", "fp32_master_weights", "gradient_checkpointing",
           "attn_implementation", "freeze_vision_tower", "freeze_multi_modal_projector",
           "freeze_language_model", *LATER_KEYS}  # (the golden literals: test_run_identity)
    before = {k: v for k, v in plan.train.model_dump().items()
              if k not in COMPARE_UNHASHED and k not in new}
    assert compare.train_hash(plan) == runs.config_hash(before)  # earlier runs stay reusable
    bf16 = compare.load_compare_config(None, ["methods=[attn]", "train.dtype=bfloat16"])
    assert compare.train_hash(compare.plan_methods(bf16)[0]) != compare.train_hash(plan)
    per_method = compare.load_compare_config(None, {"methods": [{"method": "attn",
                                                                 "dtype": "bfloat16"}]})
    with pytest.raises(ForgetlessError, match="dtype must be the same for every method"):
        compare.plan_methods(per_method)


def test_load_model_takes_dtype_device_and_attention(tmp_path):
    import importlib.util

    from forgetless.config import TrainConfig, load_config
    from forgetless.errors import ForgetlessError
    from forgetless.models import load_model

    tiny_model("llama").save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), dtype="bfloat16", device="cpu",
                          attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert load_model(str(tmp_path), dtype="auto", device="cpu")[0].dtype == torch.float32
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ForgetlessError, match="needs the flash-attn package"):
            load_config(TrainConfig, None, ["attn_implementation=flash_attention_2"])
        with pytest.raises(ForgetlessError, match="needs the flash-attn package"):
            load_model(str(tmp_path), attn_implementation="flash_attention_2")
