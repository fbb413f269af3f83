"""MoFO's CPU kernel vs fused AdamW, interleaved: a quick before/after check of the kernel path.

    PYTHONPATH=<src of the revision> .venv/bin/python bench/kernel_vs_fused.py ROUNDS LABEL

Llama-3.2-1B shapes: 1/16 of the embedding and one decoder layer (77 M parameters), one shared
state, fast and exact mode; ratio per round to fused AdamW, median [min, max]. Run it with the
old and the new ``src`` alternately on the same machine.
"""

import statistics
import sys
import time

import torch

from forgetless import MoFO

torch.set_num_threads(2)
shapes = [(128256 // 16, 2048), (2048, 2048), (512, 2048), (512, 2048), (2048, 2048),
          (8192, 2048), (8192, 2048), (2048, 8192), (2048,), (2048,)]
g = torch.Generator().manual_seed(0)
params = []
for s in shapes:
    p = torch.nn.Parameter(torch.randn(s, generator=g) * 0.02)
    p.grad = torch.randn(s, generator=g) * 1e-3
    params.append(p)
shared = {p: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(p) * 1e-3,
              "exp_avg_sq": torch.rand_like(p) * 1e-6} for p in params}
opts = {"fused": torch.optim.AdamW(params, lr=1e-5, fused=True),
        "kernel": MoFO(params, lr=1e-5, fraction=0.1, backend="kernel"),
        "kernel_exact": MoFO(params, lr=1e-5, fraction=0.1, backend="kernel", exact=True)}
with torch.no_grad():
    for o in opts.values():
        for p in params:
            o.state[p] = shared[p]
        o.step()
t = {k: [] for k in opts}
for _ in range(int(sys.argv[1])):
    for k, o in opts.items():
        s = time.perf_counter()
        o.step()
        t[k].append(time.perf_counter() - s)
for k in ("kernel", "kernel_exact"):
    r = [a / b for a, b in zip(t[k], t["fused"])]
    print(f"{sys.argv[2]} {k}/fused median {statistics.median(r):.2f}x [{min(r):.2f}, "
          f"{max(r):.2f}]  fused {statistics.median(t['fused']):.3f}s "
          f"{k} {statistics.median(t[k]):.3f}s")
