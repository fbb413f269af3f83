"""Where a model runs and in which precision: the ``device`` and ``dtype`` settings, resolved once.

Every job takes the same two strings (``device: auto|cpu|cuda|cuda:N``, ``dtype:
auto|bfloat16|float16|float32``) and turns them into torch objects here, before any model loads,
so a typo or a GPU that is not there is one ``ForgetlessError`` line, not a traceback mid-run.
Code that *uses* a model never asks these settings: it reads the device off the model
(``model_device``) and builds its tensors there.
"""

from __future__ import annotations

import importlib.util
import os
import re

import torch

from forgetless.errors import ForgetlessError

DEVICE_CHOICES = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(name: str) -> str:
    """The spelling of a device setting (availability is checked by ``resolve_device``)."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ForgetlessError(f"device '{name}' is not one of {DEVICE_CHOICES}")
    return name


def _local_rank() -> int | None:
    """This process's GPU index under ``accelerate launch`` / torchrun, else None."""
    rank = os.environ.get("LOCAL_RANK")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return int(rank) if rank is not None and world > 1 else None


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` = CUDA when available (the launcher's local GPU under ``accelerate launch``),
    else CPU; ``cuda``/``cuda:N`` must exist."""
    if isinstance(name, torch.device):
        return name
    name = check_device_name(name or "auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        # DeepSpeed, when installed, is imported by the Trainer and otherwise warns on every
        # run that it "was unable to detect" a GPU; on a CPU run that is no news
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ForgetlessError(f"device '{name}': no CUDA device is available "
                              "(torch.cuda.is_available() is False); use device=cpu or auto")
    rank = _local_rank()
    if name in ("auto", "cuda"):
        return torch.device("cuda", rank if rank is not None else torch.cuda.current_device())
    index = int(name.split(":")[1])
    if rank is not None:
        raise ForgetlessError(f"device '{name}' under a multi-process launch: every process uses "
                              "its own GPU; use device=auto or cuda")
    if index >= torch.cuda.device_count():
        raise ForgetlessError(f"device '{name}': only {torch.cuda.device_count()} CUDA "
                              "device(s) visible")
    return torch.device("cuda", index)


def resolve_dtype(name: str | torch.dtype | None = "auto",
                  device: torch.device | str | None = None) -> torch.dtype:
    """``auto`` = bfloat16 on a CUDA device that supports it, else float32."""
    if isinstance(name, torch.dtype):
        return name
    name = name or "auto"
    if name == "auto":
        device = resolve_device(device or "auto")
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in DTYPES:
        raise ForgetlessError(f"dtype '{name}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (for configs, hashes and reports)."""
    return str(dtype).removeprefix("torch.")


def check_attn_implementation(name: str | None) -> str | None:
    """A supported attention kernel; ``flash_attention_2`` only with the flash_attn package."""
    if name is None:
        return None
    if name not in ATTN_IMPLEMENTATIONS:
        raise ForgetlessError(f"attn_implementation '{name}' is not one of "
                              f"{', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ForgetlessError("attn_implementation flash_attention_2 needs the flash-attn package "
                              "(pip install flash-attn, CUDA only); use sdpa")
    return name


def model_device(model) -> torch.device:
    """Where ``model`` takes its inputs: its input embeddings' device, else its first
    parameter's (CPU for a model without parameters)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")
