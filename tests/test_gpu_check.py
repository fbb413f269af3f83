"""bench/gpu_check.py: its CPU smoke mode runs the GPU check's code path on tiny shapes."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_says_so_and_exits_0(gpu_check, capsys):
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_cpu_smoke_mode(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--steps", "2", "--opt-repeats", "1",
                           "--methods", "full,mofo,lora", "--eval-limit", "2",
                           "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert {(r["dtype"], r["optimizer"]) for r in report["optimizer"]} == {
        (d, o) for d in ("bfloat16", "float32") for o in ("adamw-fused", "mofo-torch")}
    assert [r["method"] for r in report["train"]] == ["full", "mofo", "lora"]
    for row in report["train"]:
        assert row["steps"] == 2 and row["tokens_per_s"] > 0
        assert row["optimizer_state_bytes"] == row["plan_optimizer_bytes"]
    assert report["eval"]["items"] > 0
    printed = capsys.readouterr().out
    assert "optimizer step" in printed and "training" in printed and "evaluation pass" in printed


def test_cpu_needs_tiny(gpu_check):
    assert gpu_check.main(["--device", "cpu"]) == 2
