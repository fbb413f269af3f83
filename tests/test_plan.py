"""``forgetless plan``: exact bytes from a meta model, checked against real training runs."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer, LlamaConfig

from forgetless.errors import ForgetlessError
from forgetless.models import resolve_model
from forgetless.plan import activation_estimate, load_config, parse_size, plan
from forgetless.train import train
from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("methods", "dtype"), [
    (["full", "attn+mofo", "lora", "l2-anchor"], "float32"),
    (["mlp-gate-up+mofo"], "bfloat16"),  # float32 master weights for what trains
])
def test_optimizer_bytes_equal_a_real_run(tmp_path, tokenizer, tiny_folder, methods, dtype):
    planned = {m.method: m for m in plan(str(tiny_folder), methods, batch_size=2,
                                         max_length=64, dtype=dtype).methods}
    for method in methods:
        result = train(model=tiny_llama(), tokenizer=tokenizer, method=method, dtype=dtype,
                       data="count_letters", limit=4, batch_size=2, max_steps=2, max_length=64,
                       report_to=[], save_model=False, output_dir=str(tmp_path / method))
        metrics, mine = result.metrics, planned[method]
        assert metrics["optimizer_state_bytes"] == mine.optimizer_bytes, method
        assert metrics["trainable_params"] == mine.trainable_params, method
        assert metrics["total_params"] == mine.total_params, method
        # what the update analytics held, counted from their tensors, is what plan counted
        assert metrics["update_analytics"]["bytes"] == mine.analytics_bytes > 0, method
        # float32 gradients in both cases (bf16 trains float32 masters, cast back afterwards)
        assert mine.grads_bytes == 4 * sum(p.numel() for p in result.model.parameters()
                                           if p.requires_grad)


def test_dtype_and_methods_shape_the_numbers(tiny_folder):
    fp32, bf16 = (plan(str(tiny_folder), ["full", "attn", "lora", "l2-anchor"], dtype=d)
                  for d in ("float32", "bfloat16"))
    full, attn, lora, anchor = fp32.methods
    assert max(lora.optimizer_bytes, attn.optimizer_bytes) < full.optimizer_bytes
    assert anchor.anchor_bytes == full.grads_bytes and full.anchor_bytes == 0
    assert full.optimizer_bytes == 2 * full.grads_bytes + 4 * full.trainable_tensors
    # bf16 + float32 masters: frozen weights shrink, trainable ones and their state do not
    b_full, b_attn = bf16.methods[:2]
    assert b_full.optimizer_bytes == full.optimizer_bytes
    assert b_attn.weights_bytes < attn.weights_bytes and b_attn.autocast_bytes > 0
    accumulated = plan(str(tiny_folder), ["full", "attn", "lora", "l2-anchor"],
                       dtype="float32", grad_accum=2).methods
    for one, summed in zip(fp32.methods, accumulated, strict=True):
        assert one.activation_checkpointed_bytes < one.activation_bytes
        fixed = (one.weights_bytes + one.optimizer_bytes + one.anchor_bytes
                 + one.autocast_bytes + one.analytics_bytes)
        # several micro-batches: gradients and activations are there together
        assert summed.total_bytes == fixed + one.grads_bytes + one.activation_bytes
        # one: the larger of the gradients and the activations (+ the output layer's gradient)
        assert fixed + max(one.grads_bytes, one.activation_bytes) <= one.total_bytes
        assert one.total_bytes < summed.total_bytes


def test_activation_estimate_grows_with_the_batch_and_eager_attention(tiny_folder):
    config = load_config(str(tiny_folder / "config.json"))
    small, _ = activation_estimate(config, 1, 64, 4)
    assert activation_estimate(config, 2, 64, 4)[0] == 2 * small
    assert activation_estimate(config, 1, 64, 4, "eager")[0] > small


def test_no_weights_are_read(tmp_path, tiny_folder):
    (tmp_path / "config.json").write_bytes((tiny_folder / "config.json").read_bytes())
    result = plan(str(tmp_path), ["full"], dtype="float32")  # a folder with a config only
    assert result.methods[0].trainable_params == sum(p.numel() for p in tiny_llama().parameters())


def test_parse_size():
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("80GB") == 80 * 10**9
    assert parse_size("16G") == 16 * 2**30 and parse_size("1.5 MiB") == 3 * 2**19
    for bad in ("24XB", "-1G", "0", "GiB"):
        with pytest.raises(ForgetlessError):
            parse_size(bad)


def _cli(monkeypatch, capsys, *args):
    """``forgetless plan ARGS`` in this process (a subprocess costs ~15 s of imports here):
    (exit code, stdout, stderr)."""
    from forgetless.cli import main

    monkeypatch.setattr(sys, "argv", ["forgetless", "plan", *args])
    code = 0
    try:
        main()
    except SystemExit as done:
        code = done.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_and_fits(monkeypatch, capsys, tiny_folder):
    code, out, err = _cli(monkeypatch, capsys, "--model", str(tiny_folder), "--method",
                          "full,lora", "--method", "attn", "--gpu-mem", "1GiB", "--json",
                          "--dtype", "float32", "--batch-size", "1", "--max-length", "16")
    assert code == 0, err
    data = json.loads(out)
    assert [m["method"] for m in data["methods"]] == ["full", "lora", "attn"]
    for one in data["methods"]:
        assert {"weights_bytes", "grads_bytes", "optimizer_bytes", "total_bytes"} <= set(one)
        assert one["fits"] is True
    code, out, err = _cli(monkeypatch, capsys, "--model", str(tiny_folder), "--method", "lora",
                          "--gpu-mem", "1MiB")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("lora"))
    assert row.split()[-2:] == ["no", "no"]  # 1 MiB fits neither way


@pytest.mark.parametrize("args", [["--method", "nope"], ["--gpu-mem", "lots"],
                                  ["--model", "/no/such/folder"], ["--max-length", "0"]])
def test_cli_bad_input_is_one_line(monkeypatch, capsys, args):
    code, _, err = _cli(monkeypatch, capsys, *args)
    assert code == 2
    assert err.startswith("forgetless: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_entry_point_bad_input():
    done = subprocess.run([sys.executable, "-m", "forgetless", "plan", "--gpu-mem", "lots"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("forgetless: error: --gpu-mem")


def test_update_analytics_memory_is_counted_and_bounded_by_the_sample():
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)
    def analytics(**keys):
        return plan(config, ["full"], dtype="float32", **keys).methods[0].analytics_bytes

    trainable = plan(config, ["full"], dtype="float32").methods[0].trainable_params
    assert analytics(update_stats_sample=None) == 9 * trainable  # θ₀, snapshot, a bool each
    assert analytics(update_stats=False) == 0
    # sampled: the nine weight matrices (embedding, lm_head, q/k/v/o, gate/up/down) on 1,000
    # coordinates each (+ their int64 indices), the three 256-wide norms in full
    assert analytics(update_stats_sample=1000) == 9 * 1000 * 17 + 3 * 256 * 9
    # up to twice the sample a tensor is tracked in full (a sample would cost more): at
    # 65,536 only the 256,000-coordinate embedding and lm_head are sampled
    assert analytics(update_stats_sample=65536) == 9 * (trainable - 2 * 256_000) + 2 * 65536 * 17
