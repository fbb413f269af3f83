"""How large the +ewc penalty and the +kl term are next to the CE loss, at their defaults.

    .venv/bin/python bench/remedy_scales.py [--steps 20] [--samples 16] [--lr 2e-5]
                                            [--max-length 256]

On the embedded model (SmolLM2-135M-Instruct), full fine-tuning with AdamW on count_letters
(batch 4): the EWC Fisher is estimated first on ``--samples`` gsm8k examples (the general
source; timed), then every 5 steps the script prints the CE, the EWC penalty at
``ewc_lambda`` and the forward KL on the response tokens at ``kl_weight`` (both measured, not
trained on: the run is plain ``full``, so the numbers say what the terms would add to a full
run's loss). Also the Fisher's concentration: the share of its mass in the top 1 % of
coordinates (1 % would mean flat). A default is on a sensible scale when its term reaches a
fraction of the CE within the run's length, neither 0 nor dominating from the first steps.
"""

from __future__ import annotations

import argparse
import time

import torch

from forgetless.data import build_dataset, data_collator
from forgetless.methods import MethodOptions, prepare_model
from forgetless.methods.ewc import fit_fisher
from forgetless.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    options = MethodOptions()
    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    prepared = prepare_model(model, "full+ewc+kl", options)
    ewc, kl = prepared.regularizer, prepared.distiller
    started = time.perf_counter()
    fit_fisher(ewc, model, tokenizer, source="gsm8k", samples=args.samples, seed=0,
               max_length=args.max_length, model_name="smollm2-135m", folder=None)
    fisher = torch.cat([f.reshape(-1) for f in ewc.fisher])
    top = fisher.topk(max(1, fisher.numel() // 100)).values.sum() / fisher.sum()
    print(f"Fisher: {ewc.info['examples_used']} examples in {time.perf_counter() - started:.1f} s,"
          f" mean {ewc.fisher_mean:.3e}, top 1% of coordinates hold {100 * float(top):.1f}% of"
          f" its mass", flush=True)
    del fisher
    data = build_dataset(tokenizer, "count_letters", args.max_length, 4 * args.steps, 0)
    collate = data_collator(tokenizer, args.max_length)
    optimizer = prepared.make_optimizer(lr=args.lr)
    model.train()
    for step in range(1, args.steps + 1):
        batch = collate([data[i] for i in range(4 * (step - 1), 4 * step)])
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == 1:
            with torch.no_grad():
                out = model(**batch)
                penalty = float(ewc())
                term = float(kl(out.logits, batch))
            print(f"step {step:3d}: CE {float(out.loss):.3f}  ewc (λ={options.ewc_lambda}) "
                  f"{penalty:.4f}  kl (w={options.kl_weight}) {term:.4f}", flush=True)


if __name__ == "__main__":
    main()
