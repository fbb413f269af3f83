"""Why bf16 training keeps float32 master weights by default (``fp32_master_weights: true``).

    .venv/bin/python bench/bf16_master_weights.py [--steps 10] [--lr 2e-5]

Side by side from the same bf16 weights, a small random Llama (initialiser std 0.02, as
transformers initialises, so weights sit near 0.02 in magnitude) trains ``--steps`` AdamW steps
on random tokens under bf16 autocast two ways: (a) pure bf16: weights, gradients and moments in
bf16; (b) float32 master weights, rounded to bf16 at the end (what forgetless does). It prints
the share of weights whose bf16 value changed and the size of the change relative to (b).
An AdamW step moves a weight by about ``lr``; bf16 keeps 8 significant bits, so near 0.02 its
rounding step is ~1.2e-4 and a 2e-5 step rounds back to the old value.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def train(model, steps: int, lr: float, seed: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-5)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    start = LlamaForCausalLM(config).to(torch.bfloat16)
    pure, master = copy.deepcopy(start), copy.deepcopy(start).float()
    train(pure, args.steps, args.lr, seed=1)
    train(master, args.steps, args.lr, seed=1)
    master = master.to(torch.bfloat16)
    rows = []
    torch.set_grad_enabled(False)
    for name, model in (("pure bf16", pure), ("fp32 master -> bf16", master)):
        changed = total = 0
        moved = 0.0
        for p, p0 in zip(model.parameters(), start.parameters()):
            changed += int((p != p0).sum())
            total += p.numel()
            moved += float((p.float() - p0.float()).pow(2).sum())
        rows.append((name, changed / total, moved ** 0.5))
    reference = rows[1][2]
    print(f"{args.steps} AdamW steps at lr {args.lr:g} under bf16 autocast")
    print(f"{'weights':<22} {'share changed':>14} {'||W - W0|| / master':>20}")
    for name, share, moved in rows:
        print(f"{name:<22} {share:>14.3f} {moved / reference:>20.3f}")


if __name__ == "__main__":
    main()
