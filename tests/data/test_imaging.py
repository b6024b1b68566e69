import functools
import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from medpipe.data import imaging
from tests.conftest import png_bytes


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@functools.cache
def bomb_png(side: int = 30000) -> bytes:
    """A valid black 1-bit PNG of side x side px: ~110 KB on disk, 900 M px (2.7 GB as RGB) decoded.

    Written chunk by chunk (0.3 s) rather than with PIL (3 s and the 110 MB bitmap in memory).
    """
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte "none", then the packed bits
    deflate = zlib.compressobj(9)
    pixels = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels)
            + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "I"])
def test_decode_any_mode_gives_rgb_uint8(mode):
    base = Image.fromarray(np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8))
    img = base.convert(mode) if mode not in ("I;16", "I") else Image.fromarray(
        (np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16 if mode == "I;16" else np.int32)
    )
    out = imaging.decode_image(encode(img, "TIFF" if mode == "I" else "PNG"))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert out.max() > 100  # 16-bit data is rescaled, not truncated to black


def test_sixteen_bit_is_scaled_to_full_range():
    array = np.linspace(1000, 3000, 32 * 32).reshape(32, 32).astype(np.uint16)
    out = imaging.decode_image(encode(Image.fromarray(array)))
    assert out.min() == 0 and out.max() == 255


def test_rgba_transparency_is_composited_on_black():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    out = imaging.decode_image(encode(Image.fromarray(rgba, "RGBA")))
    assert out.max() == 0


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not an image"),
    ],
)
def test_bad_bytes_raise_clear_errors(data, message):
    with pytest.raises(imaging.ImageDecodeError, match=message):
        imaging.decode_image(data)


def test_truncated_image_raises():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(imaging.ImageDecodeError, match="corrupt or truncated"):
        imaging.decode_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_from_its_header_without_decoding():
    bomb = bomb_png()
    assert len(bomb) < 200_000
    with imaging.pil_pixel_limit(None), Image.open(io.BytesIO(bomb)) as img:
        img.verify()  # a well-formed PNG (chunk CRCs checked), not just a header
        assert img.size == (30000, 30000) and img.mode == "1"
    pil_limit = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    reason = r"^too_large: 30000x30000 = 900000000 px > preprocess\.max_pixels \(89478485\)$"
    with pytest.raises(imaging.ImageTooLargeError, match=reason):
        imaging.decode_image(bomb, max_pixels=89_478_485)
    assert time.perf_counter() - start < 1.0  # decoding it would take seconds and 2.7 GB
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # the guard lifted to read the header is restored


def test_image_over_max_pixels_is_refused_quietly_and_the_limit_defaults_to_pils():
    data = encode(Image.new("L", (64, 48)))
    assert imaging.decode_image(data, max_pixels=64 * 48).shape == (48, 64, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail the test
        with imaging.pil_pixel_limit(3000), pytest.raises(
            imaging.ImageTooLargeError, match=r"too_large: 64x48 = 3072 px > preprocess\.max_pixels \(3000\)"
        ):
            imaging.decode_image(data)


def test_pil_pixel_limit_is_restored_after_the_block():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(RuntimeError), imaging.pil_pixel_limit(123):
        assert Image.MAX_IMAGE_PIXELS == 123
        raise RuntimeError
    assert Image.MAX_IMAGE_PIXELS == before


def test_pixel_hash_ignores_file_format_but_not_pixels():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    from_png = imaging.decode_image(encode(Image.fromarray(array), "PNG"))
    from_bmp = imaging.decode_image(encode(Image.fromarray(array), "BMP"))
    assert imaging.pixel_hash(from_png) == imaging.pixel_hash(from_bmp)
    changed = array.copy()
    changed[0, 0, 0] ^= 1
    assert imaging.pixel_hash(changed) != imaging.pixel_hash(array)


def test_perceptual_hash_is_close_for_small_noise_and_far_for_other_images():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:64, :64]
    base = np.stack([((xx * 4 + yy * 2) % 256).astype(np.uint8)] * 3, axis=2)
    noisy = np.clip(base.astype(int) + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
    other = np.stack([((np.sin(xx / 3.0) * np.cos(yy / 5.0) + 1) * 120).astype(np.uint8)] * 3, axis=2)
    h = int(imaging.perceptual_hash(base))
    assert bin(h ^ int(imaging.perceptual_hash(noisy))).count("1") <= 4
    assert bin(h ^ int(imaging.perceptual_hash(other))).count("1") > 10


def test_brain_contour_crop_finds_the_bright_region():
    image = np.zeros((100, 120, 3), np.uint8)
    yy, xx = np.mgrid[:100, :120]
    image[((yy - 50) / 30.0) ** 2 + ((xx - 70) / 40.0) ** 2 < 1] = 180
    top, bottom, left, right = imaging.crop_box(image, "brain_contour")
    assert abs(top - 20) <= 3 and abs(bottom - 80) <= 3
    assert abs(left - 30) <= 3 and abs(right - 110) <= 3


def test_scan_area_crop_drops_black_borders():
    image = np.zeros((80, 100, 3), np.uint8)
    image[10:70, 15:90] = 90
    image[30:40, 40:50] = 0  # dark lesion inside the scan stays inside the box
    assert imaging.crop_box(image, "scan_area") == (10, 70, 15, 90)


def test_crop_of_blank_image_keeps_everything():
    blank = np.zeros((40, 50, 3), np.uint8)
    assert imaging.crop_box(blank, "brain_contour") == (0, 40, 0, 50)
    assert imaging.crop_box(blank, "scan_area") == (0, 40, 0, 50)


def test_unknown_crop_method_is_refused():
    with pytest.raises(ValueError, match="unknown crop method 'circle'"):
        imaging.crop_box(np.zeros((4, 4, 3), np.uint8), "circle")


def test_resize_shapes_and_mask_stays_binary():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    assert imaging.resize_image(image, 32).shape == (32, 32, 3)
    assert imaging.resize_image(image, 96).shape == (96, 96, 3)
    mask = np.zeros((37, 53), bool)
    mask[10:20, 5:40] = True
    small = imaging.resize_mask(mask, 16)
    assert small.dtype == bool and small.shape == (16, 16)
    assert 0.1 < small.mean() < 0.3  # nearest-neighbour keeps the area share


def test_mask_decoding_treats_any_nonzero_as_foreground():
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 1
    mask[5, 5] = 255
    decoded = imaging.decode_mask(png_bytes(mask))
    assert decoded.sum() == 5
