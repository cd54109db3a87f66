"""Decoding one image file into 8-bit RGB, correctly or not at all.

Pillow's ``convert("RGB")`` clips 16-bit and 32-bit integer images (a 16-bit grey PNG
becomes all 255) and truncates float images (a TIFF of values in [0, 1] becomes all 0),
silently. :func:`to_rgb8` rescales those modes to 8 bits first. Decompression bombs (an
image whose pixel count is far beyond any training image) are refused before they are
decoded, naming the file. :func:`read_fitted` decodes straight to a training size, shrinking a
large image while it is read, so one huge file costs only its own small transient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_rgb", "read_size", "read_fitted", "fit", "to_rgb8", "MAX_PIXELS", "ImageError"]

#: the most pixels an image may have (about 16k x 16k); larger files are refused as decompression bombs
MAX_PIXELS = 1 << 28


class ImageError(ValueError):
    """An image file that cannot be used, with the file and what to do."""


def _from_array(a: np.ndarray, scale: float) -> Any:
    from PIL import Image

    return Image.fromarray(np.clip(np.rint(a.astype(np.float64) * scale), 0, 255).astype(np.uint8), mode="L")


def to_rgb8(image: Any, name: str = "image") -> Any:
    """``image`` (a PIL image of any mode) as 8-bit RGB, with 16/32-bit integer and float modes rescaled.

    - ``I;16*`` (16-bit): divided by 257, so 65535 -> 255.
    - ``I`` (32-bit integers): as 8-bit when every value is in [0, 255], as 16-bit when in [0, 65535];
      otherwise refused (no fixed white point).
    - ``F`` (32-bit float): [0, 1] scaled by 255, [0, 255] kept; otherwise refused.
    """
    mode = image.mode
    if mode.startswith("I;16"):
        return _from_array(np.asarray(image, dtype=np.uint16), 1 / 257).convert("RGB")
    if mode in ("I", "F"):
        a = np.asarray(image)
        if a.size == 0:
            raise ImageError(f"{name}: an empty image")
        if not np.isfinite(a).all():
            raise ImageError(f"{name}: a {mode} image with NaN or infinite values; replace it")
        lo, hi = float(a.min()), float(a.max())
        if mode == "F" and lo >= 0 and hi <= 1:
            return _from_array(a, 255.0).convert("RGB")
        if lo >= 0 and hi <= 255:
            return _from_array(a, 1.0).convert("RGB")
        if mode == "I" and lo >= 0 and hi <= 65535:
            return _from_array(a, 1 / 257).convert("RGB")
        raise ImageError(f"{name}: a {'32-bit integer' if mode == 'I' else 'float'} image with values in "
                         f"[{lo:g}, {hi:g}], which has no 8-bit meaning (expected [0, 1], [0, 255] or [0, 65535]); "
                         "convert it to 8-bit")
    return image.convert("RGB")


@contextmanager
def _opened(path: str | Path) -> Iterator[Any]:
    """``Image.open(path)`` with bombs and unreadable files (in the body too) turned into :class:`ImageError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns past MAX_IMAGE_PIXELS and raises past twice that: both are refused here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"image {path} has {w} x {h} pixels, more than the {MAX_PIXELS:,} accepted "
                                     "(a decompression bomb, or not a training image); remove it")
                yield im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image {path}: {str(e).split('.')[0]} (a decompression bomb?); remove it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                         "delete or replace it") from None


def read_rgb(path: str | Path) -> Any:
    """The image at ``path`` as an 8-bit RGB PIL image; :class:`ImageError` naming the file otherwise."""
    with _opened(path) as im:
        return to_rgb8(im, str(path))


def read_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of the image at ``path`` from its header alone (nothing is decoded)."""
    with _opened(path) as im:
        w, h = im.size
    return int(w), int(h)


def _cover(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The size ``size`` is scaled to so that it covers ``target`` (both ``(width, height)``)."""
    (w, h), (tw, th) = size, target
    scale = max(tw / w, th / h)
    return max(tw, math.ceil(w * scale)), max(th, math.ceil(h * scale))


def fit(image: Any, size: tuple[int, int]) -> Any:
    """``image`` resized (bilinear) so its shorter side fits ``size = (width, height)``, then centre-cropped
    to it; ``image`` itself when it already has that size (no resampling: its pixels are kept exactly)."""
    from PIL import Image

    if image.size == tuple(size):
        return image
    w, h = size
    nw, nh = _cover(image.size, size)
    image = image.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return image.crop((left, top, left + w, top + h))


# modes whose RGB conversion is per pixel and for which a box average is meaningful (not a palette, not
# the I/F modes whose conversion depends on the value range)
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
_GAP = 2  # shrink before resampling only down to twice the covering size, as Pillow's thumbnail() does


def read_fitted(path: str | Path, size: tuple[int, int]) -> tuple[Any, tuple[int, int]]:
    """The image at ``path`` as 8-bit RGB of exactly ``size = (width, height)`` (:func:`fit`), and its
    size in the file.

    A large image is shrunk while it is read so its transient copies stay small: a JPEG is decoded at
    1/2, 1/4 or 1/8 scale (``draft``) and an 8-bit image is box-averaged (``reduce``) before its RGB
    conversion, each only down to twice the size :func:`fit` resamples from. An image already at
    ``size`` is decoded exactly as :func:`read_rgb` does.
    """
    with _opened(path) as im:
        original = (int(im.width), int(im.height))
        if original != tuple(size):
            cw, ch = _cover(original, size)
            if im.format == "JPEG":
                im.draft(None, (cw * _GAP, ch * _GAP))
            im.load()
            factor = min(im.width // (cw * _GAP), im.height // (ch * _GAP))
            if factor >= 2 and im.mode in _REDUCIBLE:
                im = im.reduce(factor)
        rgb = to_rgb8(im, str(path))
    return fit(rgb, size), original
