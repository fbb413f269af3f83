"""MoFO's fused device passes (``optim/device.py``, ``backend="fused"``): the kernel's selection,
a constant number of host syncs and kernels per step, and one compile for many shapes.

Two ways to run them without a GPU: eagerly on a simulated device (``devicecheck``: CPU tensors
claiming the ``meta`` device, so every host copy, sync and mixed-device op is counted), and
compiled on the CPU (Inductor's C++ backend: the same functions a GPU gets as Triton). Tests
marked ``compile`` compile several variants or sizes and run only with ``pytest -m compile``;
the default run keeps one compiled test on tiny tensors.
"""

from __future__ import annotations

import logging

import pytest
import torch

from forgetless import MoFO
from forgetless.optim import device, kernel, mofo
from forgetless.optim.devicecheck import HostTraffic, OpTraffic, on_device, unwrap

needs_kernel = pytest.mark.skipif(kernel.library() is None, reason="MoFO C kernel unavailable")

# odd sizes, a prime, a 3-D tensor, a vector, tensors above the 2048-key sample, a 1x1
SHAPES = ((127, 61), (64,), (7, 9), (211, 150), (5, 13, 17), (1, 1), (3001,), (90, 40, 3))
SETTINGS = dict(lr=0.05, weight_decay=0.1, fraction=0.13)


@pytest.fixture(autouse=True)
def _compile_only_when_asked(request):
    if request.node.get_closest_marker("compile") and "compile" not in (
        request.config.getoption("-m") or ""
    ):
        pytest.skip("compile-heavy: run with -m compile")


def _params(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]


def _grads(shapes, step, tied=False):
    generator = torch.Generator().manual_seed(1000 + step)
    out = []
    for shape in shapes:
        if tied:  # few distinct values: |m| full of exact ties at the threshold
            grad = torch.randint(1, 3, shape, generator=generator).float()
            grad *= torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
        else:
            grad = torch.randn(shape, generator=generator)
        out.append(grad)
    return out


def _masks(shapes, steps, simulate=False, tied=False, params=None, **kwargs):
    """Per step: flat masks of the coordinates that changed, and the moved counts."""
    params = params if params is not None else _params(shapes)
    opt_params = [on_device(p) for p in params] if simulate else params
    opt = MoFO(opt_params, track_masks=True, **SETTINGS, **kwargs)
    history = []
    for step in range(steps):
        for p, g in zip(opt_params, _grads(shapes, step, tied), strict=True):
            p.grad = on_device(g) if simulate else g
        before = [unwrap(p).detach().clone() for p in opt_params]
        opt.step()
        changed = [(unwrap(p) != b).flatten() for p, b in zip(opt_params, before, strict=True)]
        history.append((changed, [int(unwrap(opt.state[p]["moved"])) for p in opt_params]))
    return history


def _same(a, b) -> bool:
    return all(ma == mb and all(torch.equal(x, y) for x, y in zip(ka, kb, strict=True))
               for (ka, ma), (kb, mb) in zip(a, b, strict=True))  # fmt: skip


# -- eager, simulated device --------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_fused_passes_on_a_device_select_what_the_kernel_selects(exact, tied):
    with HostTraffic(simulate=True) as traffic:
        fused = _masks(SHAPES, 3, simulate=True, tied=tied, exact=exact, backend="fused")
    kernel_run = _masks(SHAPES, 3, tied=tied, exact=exact, backend="kernel")
    assert _same(fused, kernel_run)
    assert not traffic.mixed, traffic.mixed


@pytest.mark.parametrize("exact", [False, True])
def test_host_syncs_per_step_stay_at_three_whatever_the_tensor_count(exact):
    """Brackets stay on the device: one copy of the histograms, count rounds if any; no
    per-tensor sync (the chunked path's is a constant too, but 2-4 per pass)."""
    for tensors in (3, 30):
        shapes = [(60 + 7 * i, 50) for i in range(tensors)] + [(50,)]
        with HostTraffic(simulate=True) as traffic:
            params = [on_device(p) for p in _params(shapes)]
            opt = MoFO(params, lr=1e-3, fraction=0.1, exact=exact, backend="fused")
            for step in range(3):
                for p, g in zip(params, _grads(shapes, step), strict=True):
                    p.grad = on_device(g)
                traffic.reset()
                opt.step()
                assert traffic.syncs <= 3, (tensors, traffic.events)
                assert set(traffic.events) <= {"device_to_host"}, traffic.events
                assert traffic.to_host <= 3 * len(shapes) * 1027, traffic.to_host
                assert not traffic.mixed, traffic.mixed


def test_eager_kernels_per_step_do_not_grow_with_tensor_size(monkeypatch):
    """The fused passes in eager mode dispatch a fixed number of ops per tensor: the same at
    1x and 32x the elements (the chunked path adds ~13 per Mi-element piece). A wide
    tolerance takes the first bin, so both sizes run the same passes (no count round)."""
    monkeypatch.setattr(mofo, "TOLERANCE", 1.0)
    kernels = []
    for factor in (1, 32):
        shapes = [(40 * factor, 64), (64,), (17 * factor, 64, 2)]
        with HostTraffic(simulate=True):
            params = [on_device(p) for p in _params(shapes)]
            opt = MoFO(params, lr=1e-3, fraction=0.1, backend="fused")
            for p, g in zip(params, _grads(shapes, 0), strict=True):
                p.grad = on_device(g)
            opt.step()
            with OpTraffic() as ops:
                opt.step()
        kernels.append(ops.kernels)
    assert kernels[0] == kernels[1], kernels


def test_step_on_the_device_is_read_in_one_copy_then_lives_on_the_host():
    """After a distributed resume ``step`` may land on the device: one copy for the group
    (before: one ``.item()`` per tensor), and later steps read it on the host."""
    shapes = [(50 + i, 40) for i in range(12)]
    with HostTraffic(simulate=True) as traffic:
        params = [on_device(p) for p in _params(shapes)]
        opt = MoFO(params, lr=1e-3, fraction=0.1, backend="fused")
        for p, g in zip(params, _grads(shapes, 0), strict=True):
            p.grad = on_device(g)
        opt.step()
        for p in params:
            opt.state[p]["step"] = on_device(opt.state[p]["step"].clone())
        traffic.reset()
        opt.step()
        first = traffic.syncs
        traffic.reset()
        opt.step()
        later = traffic.syncs
    assert first <= later + 1, (first, later)
    assert all(opt.state[p]["step"].device.type == "cpu" for p in params)
    assert float(opt.state[params[0]]["step"]) == 3


def test_fraction_one_is_adamw_bitwise_foreach_and_fused(monkeypatch):
    """Whole-moving tensors take AdamW's own kernels: foreach ops, or the fused kernel on
    devices that have one (CUDA; here the CPU's fused kernel stands in for it)."""
    for fused, foreach in ((False, True), (True, False)):
        if fused:
            monkeypatch.setattr(device, "FUSED_DEVICES", ("cpu",))
        ours, theirs = _params(SHAPES, 3), _params(SHAPES, 3)
        opt = MoFO(ours, lr=1e-2, weight_decay=0.1, fraction=1.0, backend="fused")
        ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=foreach,
                                fused=fused or None)  # fmt: skip
        for step in range(3):
            for a, b, g in zip(ours, theirs, _grads(SHAPES, step), strict=True):
                a.grad, b.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            torch.testing.assert_close(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"],
                                       rtol=0, atol=0)  # fmt: skip


def test_compile_switch_is_logged_once(monkeypatch, caplog):
    """FORGETLESS_MOFO_COMPILE=0: the fused backend runs eagerly and says so once, however
    many groups and steps ask."""
    monkeypatch.setenv(device.ENV, "0")
    monkeypatch.setattr(device, "_said", set())
    caplog.set_level(logging.INFO, logger="forgetless")
    params = _params([(30, 20), (40, 20), (20,)])
    groups = [{"params": params[:1]}, {"params": params[1:]}]
    opt = MoFO(groups, lr=1e-3, fraction=0.1, backend="fused")
    for step in range(3):
        for p, g in zip(params, _grads([(30, 20), (40, 20), (20,)], step), strict=True):
            p.grad = g
        opt.step()
    said = [r.message for r in caplog.records if device.ENV in r.message]
    assert len(said) == 1, said
    assert not any("compiled" in r.message for r in caplog.records)


# -- compiled (Inductor's C++ here) -------------------------------------------------------------


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@needs_kernel
def test_compiled_passes_select_what_the_kernel_selects_and_compile_once(caplog):
    """Tiny tensors, exact mode with ties (every compiled function, both tie variants): the
    kernel's moved set step by step; after the first steps neither more steps nor a model of
    other shapes and ranks compiles again; compile times are in the log."""
    caplog.set_level(logging.INFO, logger="forgetless")
    params = _params(SHAPES)
    compiled = _masks(SHAPES, 3, tied=True, exact=True, backend="fused", params=params)
    assert _same(compiled, _masks(SHAPES, 3, tied=True, exact=True, backend="kernel"))
    assert any("MoFO: compiled" in r.message for r in caplog.records) or device._compile_seconds

    warm = _graphs()
    caplog.clear()
    others = ((300, 41), (33, 17, 9), (2500,), (77, 77))
    _masks(others, 3, tied=True, exact=True, backend="fused")
    _masks(SHAPES, 2, tied=True, exact=True, backend="fused")
    assert _graphs() == warm, "a new shape or another step compiled again"
    assert not any("MoFO: compiled" in r.message for r in caplog.records)


def test_compiled_kernels_per_step_are_few_and_do_not_grow_with_size(monkeypatch):
    """Kernel launches per step (the profiler's Inductor kernels + eager glue ops), at 1x and
    32x the elements: equal, and <= 16 per filtered tensor (same passes: see above)."""
    from torch.profiler import profile

    monkeypatch.setattr(mofo, "TOLERANCE", 1.0)
    launches = []
    for factor in (1, 32):
        shapes = [(40 * factor, 64), (64,), (17 * factor, 64, 2), (9 * factor, 300)]
        params = _params(shapes)
        opt = MoFO(params, lr=1e-3, fraction=0.1, backend="fused")
        for step in range(2):
            for p, g in zip(params, _grads(shapes, step), strict=True):
                p.grad = g
            opt.step()  # the first compiles (shapes are dynamic: once for both sizes)
        with profile() as prof:
            opt.step()
        compiled = sum("cpp_fused" in e.name for e in prof.events())
        glue = sum(1 for e in prof.events() if e.name.startswith("aten::")
                   and e.cpu_parent is None)  # fmt: skip
        launches.append((compiled, glue))
    assert launches[0] == launches[1], launches
    filtered = 3
    compiled, glue = launches[0]
    assert compiled >= 2 * filtered  # really compiled: moments + step kernels per tensor
    assert compiled + glue <= 16 * filtered, launches


@pytest.mark.compile
@needs_kernel
@pytest.mark.parametrize("filter_name", ["momentum", "gradient", "random"])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_compiled_selection_every_filter(filter_name, exact, tied):
    settings = dict(filter=filter_name, exact=exact, decay_frozen=exact, tied=tied)
    assert _same(_masks(SHAPES, 3, backend="fused", **settings),
                 _masks(SHAPES, 3, backend="kernel", **settings))  # fmt: skip


@pytest.mark.compile
def test_compiled_bytes_per_element_within_budget():
    """Inductor's own count of what its kernels read and write (static compile, caches off):
    moments + histogram and the masked step stay <= 45 B per fp32 element (fused AdamW: 28
    real); a count round adds one read of the keys."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    import torch._inductor.metrics as metrics

    size = 1 << 16

    def per_element(fn, *args):
        torch._dynamo.reset()
        metrics.reset()
        torch._logging.set_logs(inductor_metrics=True)
        try:
            with inductor_config.patch(fx_graph_cache=False):
                torch.compile(fn, dynamic=False, fullgraph=True)(*args)
        finally:
            torch._logging.set_logs()
        return metrics.num_bytes_accessed / size

    g, m, v, p = (torch.randn(size) for _ in range(4))
    moments = per_element(device.moments_histogram, g, m, v, 0.1, 0.999, 0.001,
                          torch.tensor(0x3A000000), torch.tensor(12), 7, 0, 1024)  # fmt: skip
    step = per_element(device.masked_step, p, g, m, v, 0x3A800000, -1, 0, 0.99, -1e-3, 0.9,
                       1e-8, 7, 0, False, False, False)  # fmt: skip
    count = per_element(device.count_keys, g, m, 0x3A000000, 6, 7, 0, 1024)
    torch._dynamo.reset()
    assert 20 <= moments <= 28, moments  # g, m, v read; m, v written (+ histogram)
    assert 16 <= step <= 20, step  # p, m, v read; p written
    assert moments + step <= 45 and count <= 8, (moments, step, count)


@pytest.mark.compile
def test_histogram_passes_on_a_cpu_scatter_without_atomics():
    """On a CPU the histogram passes compile to one thread's plain adds (parallel, Inductor
    makes every element an atomic add the cores contend for); the masked step, which has no
    scatter, stays parallel. The same counts either way."""
    from torch._inductor.utils import run_and_get_code

    g, m, v = (torch.randn(1 << 12) for _ in range(3))
    lo, shift = torch.tensor(0x3A000000), torch.tensor(12)
    counts, code = run_and_get_code(device._compiled(device.count_keys), g, m, lo, shift, 7, 0,
                                    1024)  # fmt: skip
    assert "atomic_add" not in "".join(code) and "omp parallel" not in "".join(code)
    assert torch.equal(counts, device.count_keys(g, m, lo, shift, 7, 0, 1024))
    p = torch.randn(1 << 12)
    _, code = run_and_get_code(device._compiled(device.masked_step), p, g, m, v, 0x3A800000, -1,
                               0, 0.99, -1e-3, 0.9, 1e-8, 7, 0, False, False, False)  # fmt: skip
    assert torch.get_num_threads() == 1 or "omp parallel" in "".join(code)
