"""Decoding, cropping and resizing single images (pure functions on numpy arrays)."""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import cv2
import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError

from medpipe.errors import UserError

_PIL_LIMIT_LOCK = threading.Lock()


class ImageDecodeError(UserError, ValueError):
    """A file that should be an image could not be decoded."""


class ImageTooLargeError(ImageDecodeError):
    """An image header declares more pixels than ``preprocess.max_pixels`` (a decompression bomb, say)."""


def set_pil_pixel_limit(max_pixels: int | None) -> int | None:
    """Set PIL's process-wide decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``); return the previous one.

    PIL warns above the limit and refuses above twice the limit, also inside ``load()`` (a GIF frame that
    grows the canvas, say), so a worker process sets it to ``preprocess.max_pixels`` as a backstop of
    :func:`check_pixel_count`. ``None`` turns PIL's guard off.
    """
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    return previous


@contextmanager
def pil_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """PIL's decompression-bomb limit set to ``max_pixels`` inside the block and restored after it."""
    previous = set_pil_pixel_limit(max_pixels)
    try:
        yield
    finally:
        set_pil_pixel_limit(previous)


def check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    """Raise :class:`ImageTooLargeError` when an image of ``size`` (width, height) exceeds ``max_pixels``."""
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"too_large: {width}x{height} = {width * height} px > preprocess.max_pixels ({max_pixels})"
        )


def declared_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header, read with PIL's own size guard off; no pixel is decoded.

    Only for a file PIL's guard refused: it raises without saying the size. The guard is a PIL global,
    so it is lifted under a lock and restored at once.
    """
    with _PIL_LIMIT_LOCK, pil_pixel_limit(None), Image.open(io.BytesIO(data)) as img:
        return img.size


def _open_quietly(data: bytes) -> Image.Image:
    """``Image.open`` without PIL's DecompressionBombWarning: :func:`check_pixel_count` decides instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes of any PIL mode (L, RGB, RGBA, P, I;16, I, F, ...) into uint8 RGB (H, W, 3).

    An image of more than ``max_pixels`` pixels (default: PIL's current limit) is refused from its header,
    before any pixel is decoded, with :class:`ImageTooLargeError`.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with _open_quietly(data) as img:  # lazy: reads the header only
            if limit is not None:
                check_pixel_count(img.size, limit)
            img.load()
            return to_rgb_uint8(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:  # PIL's guard refused it first (more than twice its limit)
        if limit is not None:
            check_pixel_count(declared_size(data), limit)
        raise ImageTooLargeError(f"too_large: {err}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image PIL can identify") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise ImageDecodeError(f"corrupt or truncated image: {err}") from None


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        grey = np.round(scaled).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def channel_max(image: np.ndarray) -> np.ndarray:
    """Per-pixel maximum over the channels of an (H, W, 3) image (much faster than ``max(axis=2)``)."""
    return np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])


def decode_mask(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode a mask file into a boolean (H, W) array: any non-zero pixel is foreground."""
    return channel_max(decode_image(data, max_pixels)) > 0


def pixel_hash(image: np.ndarray) -> str:
    """SHA-256 of the decoded pixels and their shape: equal for pixel-identical images in any file format."""
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def perceptual_hash(image: np.ndarray) -> np.uint64:
    """64-bit DCT perceptual hash (imagehash.phash) of an RGB uint8 image."""
    bits = imagehash.phash(Image.fromarray(image)).hash.flatten()
    return np.uint64(int("".join("1" if b else "0" for b in bits), 2))


def _largest_contour(binary: np.ndarray) -> np.ndarray | None:
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    return max(contours, key=cv2.contourArea)


def brain_contour_box(image: np.ndarray, threshold: int = 45) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the brain: the extreme points of the largest contour.

    The recipe of the brain-MRI tumour-detection study: blur, threshold, erode and dilate twice,
    take the largest external contour and crop at its extreme left/right/top/bottom points.
    """
    grey = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (5, 5), 0)
    binary = cv2.threshold(grey, threshold, 255, cv2.THRESH_BINARY)[1]
    binary = cv2.dilate(cv2.erode(binary, None, iterations=2), None, iterations=2)
    contour = _largest_contour(binary)
    height, width = grey.shape
    if contour is None or cv2.contourArea(contour) < 0.01 * height * width:
        return 0, height, 0, width
    points = contour[:, 0, :]
    left, right = int(points[:, 0].min()), int(points[:, 0].max())
    top, bottom = int(points[:, 1].min()), int(points[:, 1].max())
    return top, bottom + 1, left, right + 1


def scan_area_box(image: np.ndarray, threshold: int = 10) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the ultrasound scan area: the bounding box of the largest
    region brighter than ``threshold``, which drops black borders around the scan."""
    grey = channel_max(image)
    binary = (grey > threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    height, width = grey.shape
    if count <= 1:
        return 0, height, 0, width
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[largest, :4])
    if w * h < 0.25 * height * width:  # a small bright blob is not the scan: keep the image
        return 0, height, 0, width
    return y, y + h, x, x + w


def crop_box(image: np.ndarray, method: str) -> tuple[int, int, int, int]:
    if method == "brain_contour":
        return brain_contour_box(image)
    if method == "scan_area":
        return scan_area_box(image)
    if method == "none":
        return 0, image.shape[0], 0, image.shape[1]
    raise ValueError(f"unknown crop method {method!r}; expected brain_contour, scan_area or none")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to (size, size): area averaging when shrinking, bicubic when enlarging."""
    if image.shape[:2] == (size, size):
        return image
    shrinking = image.shape[0] >= size and image.shape[1] >= size
    out = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    return out if out.ndim == 3 else out[..., None]


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a boolean mask with nearest-neighbour sampling (labels are never blended)."""
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
