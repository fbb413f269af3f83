"""Image files: checked when data is read (one line per bad file), opened as RGB for processors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forgetless.errors import ForgetlessError


def check_image(path: Path, where: str) -> Path:
    """Open and decode ``path`` now, so a bad image fails before a model loads.

    Any exception from decoding is "unreadable": Pillow's plugins raise many types on damaged
    files (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, ...). Images
    above Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) are refused rather than
    decoded (a VLM's processor would shrink them anyway), and Pillow's warnings about odd files
    stay quiet, so a user sees one line or none."""
    import warnings

    from PIL import Image

    try:
        found = path.is_file()
    except (OSError, ValueError) as err:  # e.g. a name too long for the file system
        raise ForgetlessError(f"{where}: bad image path {str(path)[:120]!r} ({err})") from None
    if not found:
        raise ForgetlessError(f"{where}: image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ForgetlessError(f"{where}: image {path} has more than {Image.MAX_IMAGE_PIXELS:,} "
                              "pixels (Pillow's limit); downscale it") from None
    except MemoryError:
        raise ForgetlessError(f"{where}: image {path} is too large to decode") from None
    except Exception as err:  # noqa: BLE001 - a damaged file raises many types; one line is the contract
        reason = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise ForgetlessError(f"{where}: unreadable image {path} ({reason})") from None
    return path


def open_image(image: Any) -> Any:
    """An RGB PIL image from a path or a PIL image (processors want three channels)."""
    from PIL import Image

    if isinstance(image, str | Path):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    return image.convert("RGB")
