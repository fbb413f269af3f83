"""Measure what an optimizer step hands to the host, on an accelerator or on a simulated one.

On a GPU, every device-to-host copy (``.cpu()``, ``.item()``, ``.tolist()``, ``int(t)``), every
blocking host-to-device copy and every op whose output size depends on the data (``nonzero``,
boolean indexing, ``bincount`` and ``histc`` without a range, ``unique`` ...) stops the host
until the device queue drains. MoFO's torch path is meant to do a few of those per parameter
group and step, moving O(tensors x bins) elements; this module counts them so a test can say so.

:class:`HostTraffic` is a ``TorchDispatchMode`` that sees every op. Tensors it treats as "on the
device" are those not on the CPU, or, with ``simulate=True``, CPU tensors wrapped by
:func:`on_device`: they claim the ``meta`` device, so any code that asks ``t.device`` takes its
accelerator branch and factories called with that device are built (as CPU tensors, wrapped)
inside the mode, while the arithmetic runs for real on the CPU. A CPU-only machine can thus
show that a step does not copy its tensors to the host, and catch ops that mix a non-scalar
CPU tensor with device tensors (an error on CUDA, recorded in ``mixed``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE_DEVICE = torch.device("meta")

# ops whose output size depends on the values: the host waits for the device to know it
DATA_DEPENDENT = {
    "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
    "unique_dim", "bincount", "histc", "histogram", "repeat_interleave", "_local_scalar_dense",
    "equal", "is_nonzero",
}  # fmt: skip


class OnDevice(Tensor):
    """A CPU tensor presented as living on the ``meta`` device (see :func:`on_device`)."""

    elem: Tensor

    @staticmethod
    def __new__(cls, elem: Tensor) -> OnDevice:
        wrapper = Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, device=FAKE_DEVICE, requires_grad=elem.requires_grad,
        )  # fmt: skip
        wrapper.elem = elem
        return wrapper

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: simulated device tensors work only inside HostTraffic")

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"


def on_device(tensor: Tensor) -> Tensor:
    """Wrap a CPU tensor (a Parameter keeps its ``grad`` wrapped too) for ``simulate=True``."""
    wrapped = OnDevice(tensor.detach())
    if tensor.grad is not None:
        wrapped.grad = OnDevice(tensor.grad.detach())
    return wrapped


def unwrap(tensor: Tensor) -> Tensor:
    """The CPU tensor behind a simulated device tensor (the tensor itself otherwise)."""
    return tensor.elem if isinstance(tensor, OnDevice) else tensor


class HostTraffic(TorchDispatchMode):
    """Count host transfers and synchronisations of device tensors while the mode is active.

    Attributes:
        to_host: elements copied from device tensors to the host (``.cpu()``, ``.item()``...).
        syncs: operations that make the host wait for the device: device-to-host copies,
            blocking host-to-device copies, scalar reads and data-dependent shapes.
        ops: how many times each op ran on device tensors; ``events``: each sync, by kind.
        mixed: ops that received a non-scalar CPU tensor together with device tensors.
    """

    def __init__(self, simulate: bool = False) -> None:
        super().__init__()
        self.simulate = simulate
        self.to_host = 0
        self.syncs = 0
        self.ops: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.mixed: Counter[str] = Counter()

    def reset(self) -> None:
        self.to_host, self.syncs = 0, 0
        for counter in (self.ops, self.events, self.mixed):
            counter.clear()

    def _on_device(self, tensor: Tensor) -> bool:
        return isinstance(tensor, OnDevice) if self.simulate else tensor.device.type != "cpu"

    def _sync(self, kind: str, elements: int = 0) -> None:
        self.syncs += 1
        self.to_host += elements
        self.events[kind] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, Tensor)]
        device_in = [t for t in tensors if self._on_device(t)]
        host_in = [t for t in tensors if not self._on_device(t)]
        target = kwargs.get("device")
        target = None if target is None else torch.device(target)
        to_host = target is not None and target.type == "cpu"
        to_device = target is not None and target.type != "cpu"
        if device_in:
            self.ops[name] += 1

        if name in ("_to_copy", "to") and args and isinstance(args[0], Tensor):
            source_on_device = self._on_device(args[0])
            if source_on_device and to_host:
                self._sync("device_to_host", args[0].numel())
            elif not source_on_device and to_device:
                self._sync("host_to_device")
        elif name == "copy_" and len(args) >= 2:
            dst_on_device, src_on_device = self._on_device(args[0]), self._on_device(args[1])
            if src_on_device and not dst_on_device:
                self._sync("device_to_host", args[1].numel())
            elif dst_on_device and not src_on_device:
                self._sync("host_to_device")
        elif device_in and name == "_local_scalar_dense":
            self._sync("item", 1)
        elif device_in and name in DATA_DEPENDENT:
            if name != "repeat_interleave" or kwargs.get("output_size") is None:
                self._sync(name)
        elif (
            device_in
            and name == "index"
            and any(
                isinstance(i, Tensor) and i.dtype == torch.bool for i in tree_flatten(args[1:])[0]
            )
        ):
            self._sync("boolean_index")
        elif device_in and any(t.dim() > 0 for t in host_in):
            self.mixed[name] += 1

        if not self.simulate:
            return func(*args, **kwargs)
        if any(t.device.type == FAKE_DEVICE.type and not isinstance(t, OnDevice) for t in host_in):
            raise RuntimeError(
                f"{name}: a real meta tensor (data lost) met a simulated device; "
                f"was it built outside the mode's view, e.g. torch.tensor(...)?"
            )
        return self._run_simulated(func, args, kwargs, bool(device_in), to_host, to_device)

    def _run_simulated(self, func, args, kwargs, device_in: bool, to_host: bool,
                       to_device: bool) -> Any:  # fmt: skip
        """Run the op on the wrapped CPU tensors; wrap outputs that would live on the device."""
        wrappers = {}

        def strip(x):
            if isinstance(x, OnDevice):
                wrappers[id(x.elem)] = x
                return x.elem
            if isinstance(x, torch.device) and x.type == FAKE_DEVICE.type:
                return torch.device("cpu")
            return x

        args, kwargs = tree_map(strip, (args, kwargs))
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "meta":
            kwargs["device"] = torch.device("cpu")
        out = func(*args, **kwargs)
        stays = to_device or (device_in and not to_host)
        if func.overloadpacket.__name__ == "copy_":  # the destination decides
            stays = id(args[0]) in wrappers

        def wrap(x):
            if not isinstance(x, Tensor):
                return x
            if id(x) in wrappers:  # an in-place op or out= returns its (wrapped) argument
                return wrappers[id(x)]
            return OnDevice(x) if stays else x

        return tree_map(wrap, out)


# ops that launch no kernel: allocation and metadata (views are recognised by their schema)
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
             "lift_fresh", "resize_", "set_", "_local_scalar_dense", "is_same_size", "sym_size",
             "sym_numel", "sym_stride", "sym_storage_offset", "_record_function_enter_new",
             "_record_function_exit"}  # fmt: skip


class OpTraffic(TorchDispatchMode):
    """Count the kernels an eager step launches and the bytes they touch, on any device.

    ``kernels``: dispatched ops that do work (views and allocations excluded); ``bytes``: the
    sizes of their tensor inputs plus outputs (an in-place op counts its tensor read and
    written), the usual first-order model of a bandwidth-bound step. ``ops`` names them."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.bytes = 0
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in NO_KERNEL:
            return out
        self.kernels += 1
        self.ops[name] += 1
        for x in tree_flatten((args, kwargs, out))[0]:
            if isinstance(x, Tensor):
                self.bytes += x.numel() * x.element_size()
        return out
