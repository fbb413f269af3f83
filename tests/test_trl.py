"""forgetless.MoFO and forgetless.ForgettingMonitor inside TRL's SFTTrainer (optional: trl)."""

import pytest

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from forgetless import ForgettingMonitor, MoFO  # noqa: E402
from forgetless.models import resolve_model  # noqa: E402
from forgetless.optim.mofo import TOLERANCE  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

FRACTION = 0.1


def _conversations(n: int = 8) -> Dataset:
    return Dataset.from_list([
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                      {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}
        for i in range(n)
    ])


def test_sft_trainer_with_mofo_and_the_monitor(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    # The README's five lines:
    optimizer = MoFO(model.parameters(), lr=1e-2, fraction=FRACTION, weight_decay=0.0,
                     track_masks=True)
    monitor = ForgettingMonitor(every=1, prompts=["The capital of France is", "2 + 2 ="])
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                         logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         max_length=64, bf16=True)  # bf16 autocast: SFTConfig's default
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_conversations(),
                             processing_class=tokenizer, optimizers=(optimizer, None),
                             callbacks=[monitor])
    monitor.attach(trainer)  # log through Trainer.log (TensorBoard, W&B, ... see it)
    trainer.train()

    assert trainer.state.global_step == 2
    for name, param in model.named_parameters():
        moved = int(optimizer.state[param]["moved"])  # coordinates moved at the last step
        changed = int((param.detach() != before[name]).sum())
        if param.ndim < 2:  # norms take a plain AdamW step, as in the paper
            assert moved == param.numel(), name
            continue
        k = round(FRACTION * param.numel())
        assert abs(moved - k) <= max(1, TOLERANCE * k), name
        assert 0 < changed <= 2 * (k + max(1, TOLERANCE * k)), name  # two steps of ~k each

    logged = [log for log in trainer.state.log_history if "forgetting/kl" in log]
    assert [log["step"] for log in logged] == [1, 2]
    # The base is a real copy: its KL to the trained model is not 0 (accelerate's autocast
    # wrapper used to make the copy run the live model)
    assert logged[-1]["forgetting/kl"] > 0 and len(monitor.history) == 2
