"""What one optimizer step costs a device, counted on a CPU: kernels, bytes, host syncs, time.

    PYTHONPATH=src .venv/bin/python bench/device_traffic.py [--repeats 5] [--threads 2]

Optimizers: torch AdamW (foreach, fused), MoFO's device path eager (the chunked torch path,
``backend="torch"``, and the fused passes run eagerly), MoFO's device path compiled
(``backend="fused"``: torch.compile, Inductor's C++ here, Triton on a GPU) and MoFO's C kernel
(the CPU default). Fraction 0.1, fast mode unless said.

Part 1, counts that do not depend on the hardware, on Llama-3.2-shaped tensors scaled down
(hidden 64) at 1x and 32x the elements (every tensor's first dim x 32):
- eager kernels: ops dispatched per step (``devicecheck.OpTraffic``: views and allocations
  excluded); bytes: their input + output tensor sizes, per parameter element;
- compiled kernels: kernel launches the profiler records per step (Inductor's kernels plus the
  eager glue around them); bytes: Inductor's own count of what its kernels read and write
  (``graph.count_bytes``, per element of each compiled function, fp32 and bf16) times the
  elements each function saw, plus the glue's bytes counted as for eager code;
- host syncs: per step on a simulated device (``devicecheck.HostTraffic``), exact mode too;
- the C kernel: C calls per step (ctypes calls counted), bytes by construction (not traced).

Part 2, step time on this CPU: Llama-3.2-1B shapes, a quarter of the embedding (32064 x 2048)
and 2 decoder layers (187 M parameters), all optimizers on the same tensors, interleaved rounds;
per-round ratio to fused AdamW, median [min, max].

Part 3 (``--passes MI``): each compiled pass alone on one tensor of MI Mi elements, beside the
same moment update without its histogram and fused AdamW's step: where the time goes. Also the
histogram's other formulations Inductor can compile, to show what a <= 2x step would leave it:
the scatter alone (one thread, as MoFO runs it) and counting by reductions (``(key >= t).sum()``
per threshold, vectorised, fused into the moment update) at 8 and 32 thresholds.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import time

import torch
from torch.profiler import profile
from torch.utils._python_dispatch import _disable_current_modes

from forgetless import MoFO
from forgetless.optim import device, kernel
from forgetless.optim.devicecheck import HostTraffic, OpTraffic, on_device

FRACTION = 0.1


def llama_shapes(hidden: int, mlp: int, kv: int, vocab: int, layers: int = 2):
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
        shapes += [(mlp, hidden), (mlp, hidden), (hidden, mlp), (hidden,), (hidden,)]
    return shapes


SMALL = llama_shapes(64, 256, 16, 4008, layers=3)  # 28 tensors


def scaled(shapes, factor: int):
    return [(s[0] * factor, *s[1:]) for s in shapes]


def make(shapes, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(dtype))
        p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(dtype)
        params.append(p)
    return params


@contextlib.contextmanager
def env(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name)
        else:
            os.environ[name] = saved


# -- part 1: counts -----------------------------------------------------------------------------


def inductor_per_element(fn_args: dict, size: int = 1 << 20) -> dict:
    """(kernels, bytes per element) of each compiled function, from Inductor's own counters
    (a static compile of ``size`` elements, caches off so code is really generated)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    import torch._inductor.metrics as metrics

    out = {}
    for name, (fn, make_args) in fn_args.items():
        torch._dynamo.reset()
        metrics.reset()
        torch._logging.set_logs(inductor_metrics=True)
        logging.getLogger("torch._inductor.compile_fx").setLevel(logging.WARNING)
        try:
            with inductor_config.patch(fx_graph_cache=False):
                torch.compile(fn, dynamic=False, fullgraph=True)(*make_args(size))
        finally:
            torch._logging.set_logs()
        out[name] = (metrics.generated_kernel_count, metrics.num_bytes_accessed / size)
    torch._dynamo.reset()
    return out


def function_args(dtype):
    def tensors(n, count):
        return [torch.randn(n).to(dtype) for _ in range(count)]

    return {
        "moments_histogram": (device.moments_histogram, lambda n: (
            *tensors(n, 3), 0.1, 0.999, 0.001, torch.tensor(0x3A000000), torch.tensor(12),
            7, 0, 1024)),
        "count_keys": (device.count_keys, lambda n: (*tensors(n, 2), 0x3A000000, 6, 7, 0, 1024)),
        "masked_step": (device.masked_step, lambda n: (
            *tensors(n, 4), 0x3A800000, -1, 0, 0.99, -1e-3, 0.9, 1e-8, 7, 0, False, False,
            False)),
    }  # fmt: skip


def count_eager(step) -> tuple[int, int]:
    step()  # state built outside the count
    with OpTraffic() as traffic:
        step()
    return traffic.kernels, traffic.bytes


def count_compiled(step, per_element: dict) -> tuple[int, float, int]:
    """(launches per step, bytes per step, calls of compiled functions) of the fused path."""
    step()  # compile outside the count
    with profile() as prof:
        step()
    launches = 0
    for event in prof.events():
        if "cpp_fused" in event.name or "triton_" in event.name:
            launches += 1
    # the eager glue: ops outside the compiled functions (these run with the mode disabled)
    device.METER = []
    original = device.run

    def bypass(fn, compiled, *args, **kwargs):
        with _disable_current_modes():
            return original(fn, compiled, *args, **kwargs)

    device.run = bypass
    try:
        with OpTraffic() as glue:
            step()
    finally:
        device.run = original
    calls, device.METER = device.METER, None
    nbytes = glue.bytes
    for name, numel, itemsize in calls:
        if name in per_element:
            nbytes += per_element[name][itemsize][1] * numel
    glue_launches = glue.kernels
    return launches + glue_launches, nbytes, len(calls)


def count_kernel_calls(step) -> tuple[int, int]:
    """(C calls, torch ops) of one kernel-path step."""
    lib = kernel.library()
    calls = [0]
    originals = {}
    for name in ("mofo_moments", "mofo_count", "mofo_update", "mofo_ties", "mofo_bracket",
                 "mofo_step_each"):  # fmt: skip
        fn = getattr(lib, name)
        originals[name] = fn

        def counted(*args, _fn=fn):
            calls[0] += 1
            return _fn(*args)

        setattr(lib, name, counted)
    step()
    calls[0] = 0
    try:
        with OpTraffic() as ops:
            step()
    finally:
        for name, fn in originals.items():
            setattr(lib, name, fn)
    return calls[0], ops.kernels


def syncs_on_device(shapes, backend: str, exact: bool) -> int:
    with HostTraffic(simulate=True) as traffic:
        params = [on_device(p) for p in make(shapes)]
        opt = MoFO(params, lr=1e-3, fraction=FRACTION, exact=exact, backend=backend)
        opt.step()
        traffic.reset()
        opt.step()
    return traffic.syncs


def part1(per_element) -> None:
    print("\n## Part 1: per step, Llama-3.2 tensor shapes scaled down "
          f"({len(SMALL)} tensors), fraction {FRACTION}, fast mode, float32")  # fmt: skip
    rows = {}
    for factor in (1, 32):
        shapes = scaled(SMALL, factor)
        numel = sum(torch.Size(s).numel() for s in shapes)

        def fresh(kind, shapes=shapes):
            params = make(shapes)
            if kind == "adamw_foreach":
                return torch.optim.AdamW(params, lr=1e-3, foreach=True).step
            if kind == "adamw_fused":
                return torch.optim.AdamW(params, lr=1e-3, fused=True).step
            backend = {"mofo_torch_eager": "torch", "mofo_fused_eager": "fused",
                       "mofo_fused_compiled": "fused", "mofo_kernel": "kernel"}[kind]  # fmt: skip
            return MoFO(params, lr=1e-3, fraction=FRACTION, backend=backend).step

        for kind in ("adamw_foreach", "adamw_fused", "mofo_torch_eager", "mofo_fused_eager"):
            with env(device.ENV, "0"):
                kernels, nbytes = count_eager(fresh(kind))
            rows.setdefault(kind, []).append((kernels, nbytes / numel))
        launches, nbytes, calls = count_compiled(fresh("mofo_fused_compiled"), per_element)
        rows.setdefault("mofo_fused_compiled", []).append((launches, nbytes / numel))
        c_calls, ops = count_kernel_calls(fresh("mofo_kernel"))
        rows.setdefault("mofo_kernel", []).append((c_calls + ops, None))
        print(f"  {factor}x: {numel:,} elements; compiled path: {calls} compiled-function calls")
    syncs = {
        "mofo_torch_eager": [syncs_on_device(SMALL, "torch", e) for e in (False, True)],
        "mofo_fused_eager": [syncs_on_device(SMALL, "fused", e) for e in (False, True)],
    }
    syncs["mofo_fused_compiled"] = syncs["mofo_fused_eager"]  # the same host/device flow
    print(f"\n  {'optimizer':22s} {'kernels 1x -> 32x':>20s} {'B/elem 1x -> 32x':>20s} "
          f"{'syncs fast/exact':>17s}")  # fmt: skip
    for kind, ((k1, b1), (k32, b32)) in rows.items():
        b = "by construction" if b1 is None else f"{b1:7.1f} -> {b32:6.1f}"
        s = syncs.get(kind)
        s_text = "0 (CPU)" if kind.startswith("adamw") or kind == "mofo_kernel" else (
            f"{s[0]} / {s[1]}")  # fmt: skip
        print(f"  {kind:22s} {k1:8d} -> {k32:8d} {b:>20s} {s_text:>17s}")
    print("  (mofo_kernel: C calls + torch ops; its passes stream 20 B (moments) + 16 B (step)"
          " per element by construction, + 4 B per count round)")  # fmt: skip


# -- part 2: time -------------------------------------------------------------------------------


def part2(repeats: int, layers: int, embedding_share: int) -> None:
    shapes = llama_shapes(2048, 8192, 512, 128256 // embedding_share, layers=layers)
    print(f"\n## Part 2: step time, Llama-3.2-1B shapes (1/{embedding_share} of the embedding "
          f"+ {layers} layers), {torch.get_num_threads()} threads, {repeats} interleaved "
          f"rounds")  # fmt: skip
    params = make(shapes)
    numel = sum(p.numel() for p in params)
    print(f"  {numel / 1e6:.0f} M parameters")
    steps = {
        "adamw_fused": torch.optim.AdamW(params, lr=1e-5, fused=True).step,
        "adamw_foreach": torch.optim.AdamW(params, lr=1e-5, foreach=True).step,
        "mofo_kernel": MoFO(params, lr=1e-5, fraction=FRACTION, backend="kernel").step,
        "mofo_fused_compiled": MoFO(params, lr=1e-5, fraction=FRACTION, backend="fused").step,
        "mofo_torch_eager": MoFO(params, lr=1e-5, fraction=FRACTION, backend="torch").step,
    }
    shared = {p: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(p) * 1e-3,
                  "exp_avg_sq": torch.rand_like(p) * 1e-6} for p in params}  # fmt: skip
    for step in steps.values():  # one state for all (AdamW's names): memory stays one copy
        optimizer = step.__self__
        for p in params:
            optimizer.state[p] = shared[p]
    for name, step in steps.items():  # warm-up: compile, kernel build
        start = time.perf_counter()
        step()
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s")
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base = times["adamw_fused"]
    for name, values in times.items():
        ratios = [t / b for t, b in zip(values, base, strict=True)]
        print(f"  {name:20s} {statistics.median(values):7.3f} s/step [{min(values):.3f}, "
              f"{max(values):.3f}]  / fused AdamW {statistics.median(ratios):5.2f}x "
              f"[{min(ratios):.2f}, {max(ratios):.2f}]")  # fmt: skip


def _moments_only(g, m, v, w1: float, beta2: float, w2: float) -> None:
    """AdamW's moment update alone: ``moments_histogram`` without its histogram."""
    m.lerp_(g, w1)
    v.mul_(beta2).addcmul_(g, g, value=w2)


def _moments_counting(thresholds: int):
    """The moment update fused with counts of keys >= each of ``thresholds`` edges, one
    vectorised reduction per edge: the histogram's scatter-free formulation."""

    def moments_counting(g, m, v, w1: float, beta2: float, w2: float, edges):
        _moments_only(g, m, v, w1, beta2, w2)
        keys = m.abs().view(torch.int32)
        return torch.stack([(keys >= edges[j]).sum(dtype=torch.int32)
                            for j in range(thresholds)])  # fmt: skip

    return torch.compile(moments_counting, dynamic=True, fullgraph=True)


def part3(repeats: int, numel: int) -> None:
    """Where the compiled step's time goes, on one tensor: each compiled pass as MoFO runs it,
    the moment update without the histogram (the same pass at pure bandwidth), and fused
    AdamW's whole step, interleaved; medians in ms and ns per element."""
    print(f"\n## Part 3: the compiled passes on one {numel / 2**20:.0f} Mi-element fp32 tensor, "
          f"{torch.get_num_threads()} threads, {repeats} interleaved rounds")  # fmt: skip
    g, m, v, p = (torch.randn(numel) for _ in range(4))
    m.mul_(1e-3)
    v.abs_().mul_(1e-6)
    lo = torch.tensor(device._bits(m[: 1 << 16]).kthvalue(int(0.88 * (1 << 16))).values.item())
    shift = torch.tensor(12)
    threshold = int(device._bits(m[: 1 << 16]).kthvalue(int(0.9 * (1 << 16))).values)
    param = torch.nn.Parameter(p.clone())
    param.grad = g.clone()
    fused = torch.optim.AdamW([param], lr=1e-5, fused=True)
    passes = {
        "moments + histogram (compiled as MoFO runs it)": lambda: device.run(
            device.moments_histogram, True, g, m, v, 0.1, 0.999, 0.001, lo, shift, 0, 0, 1024),
        "moments only (compiled, all threads)": lambda: device.run(
            _moments_only, True, g, m, v, 0.1, 0.999, 0.001),
        "masked step (compiled)": lambda: device.run(
            device.masked_step, True, p, g, m, v, threshold, -1, 0, 1.0, -1e-5, 1.0, 1e-8, 0,
            0, False, False, False),
        "AdamW fused, whole step": fused.step,
        "histogram alone (compiled scatter, one thread)": lambda: device.run(
            device.count_keys, True, g, m, lo, shift, 0, 0, 1024),
    }
    for thresholds in (8, 32):
        edges = (lo + (torch.arange(thresholds) << 12)).to(torch.int32)
        counting = _moments_counting(thresholds)
        passes[f"moments + {thresholds} counts by reductions (compiled)"] = (
            lambda counting=counting, edges=edges: counting(g, m, v, 0.1, 0.999, 0.001, edges))
    for step in passes.values():
        step()  # compile
    times = {name: [] for name in passes}
    for _ in range(repeats):
        for name, step in passes.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:52s} {1e3 * median:7.1f} ms [{1e3 * min(values):.1f}, "
              f"{1e3 * max(values):.1f}]  {1e9 * median / numel:5.2f} ns/elem")  # fmt: skip
    medians = {name: statistics.median(values) for name, values in times.items()}
    left = 2 * medians["AdamW fused, whole step"] - medians["masked step (compiled)"] - medians[
        "moments only (compiled, all threads)"]  # fmt: skip
    print(f"  => a step at 2x fused AdamW leaves the histogram {1e9 * left / numel:.2f} ns/elem "
          f"(2 x fused - moments only - masked step; sampling and glue not counted)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-counts", action="store_true")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers timed (part 2)")
    parser.add_argument("--embedding-share", type=int, default=4,
                        help="time 1/N of the embedding's rows (part 2)")  # fmt: skip
    parser.add_argument("--passes", type=int, default=0, metavar="MI",
                        help="also time each compiled pass on one tensor of MI Mi elements")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="  log: %(message)s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, MoFO kernel: "
          f"{'yes' if kernel.library() else kernel.why_unavailable()}")  # fmt: skip
    if args.skip_counts:
        with torch.no_grad():
            part2(args.repeats, args.layers, args.embedding_share)
            if args.passes:
                part3(args.repeats, args.passes << 20)
        return
    per_element = {}
    for dtype in (torch.float32, torch.bfloat16):
        counted = inductor_per_element(function_args(dtype))
        itemsize = torch.empty((), dtype=dtype).element_size()
        for name, value in counted.items():
            per_element.setdefault(name, {})[itemsize] = value
    print("Inductor's counts per compiled function (kernels generated, bytes per element):")
    for name, by_size in per_element.items():
        print(f"  {name:18s} fp32 {by_size[4][0]} kernels {by_size[4][1]:5.1f} B/elem; "
              f"bf16 {by_size[2][0]} kernels {by_size[2][1]:5.1f} B/elem")  # fmt: skip
    fp32 = sum(per_element[n][4][1] for n in ("moments_histogram", "masked_step"))
    bf16 = sum(per_element[n][2][1] for n in ("moments_histogram", "masked_step"))
    print(f"  => compiled passes, fast mode without a count round: fp32 (incl. bf16 weights "
          f"with fp32 masters) {fp32:.1f} B/elem, all-bf16 state {bf16:.1f} B/elem; "
          f"+{per_element['count_keys'][4][1]:.1f} (fp32) per count round")  # fmt: skip
    part1(per_element)
    if not args.skip_time:
        with torch.no_grad():
            part2(args.repeats, args.layers, args.embedding_share)
            if args.passes:
                part3(args.repeats, args.passes << 20)


if __name__ == "__main__":
    main()
