"""PNG out and in: bit depths and colour checked against the PNG header bytes, refusals."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from medaug.errors import ImageReadError
from medaug.io.png import read_png, write_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_GRAY, PNG_RGB = 0, 2  # IHDR colour types


def _ihdr(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) straight from the IHDR chunk that follows the signature."""
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE and raw[12:16] == b"IHDR"
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", raw[16:26])
    return width, height, bit_depth, colour_type


def test_8bit_gray_round_trip(tmp_path: Path) -> None:
    image_hw = np.random.default_rng(0).integers(0, 256, size=(7, 11), dtype=np.uint8)
    path = write_png(image_hw, tmp_path / "gray8.png")
    assert _ihdr(path) == (11, 7, 8, PNG_GRAY)
    read = read_png(path)
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, image_hw)
    assert not list(tmp_path.glob(".part-*"))


def test_16bit_gray_round_trip_keeps_all_bits(tmp_path: Path) -> None:
    image_hw = np.random.default_rng(1).integers(0, 65536, size=(9, 5), dtype=np.uint16)
    image_hw[0, 0], image_hw[-1, -1] = 0, 65535
    path = write_png(image_hw, tmp_path / "gray16.png")
    assert _ihdr(path) == (5, 9, 16, PNG_GRAY)
    read = read_png(path)
    assert read.dtype == np.uint16
    np.testing.assert_array_equal(read, image_hw)


def test_big_endian_uint16_is_written_by_value(tmp_path: Path) -> None:
    image_hw = np.array([[1, 256], [4097, 65535]], dtype=">u2")
    np.testing.assert_array_equal(read_png(write_png(image_hw, tmp_path / "be.png")), image_hw.astype(np.uint16))


def test_rgb_round_trip(tmp_path: Path) -> None:
    image_hw3 = np.random.default_rng(2).integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
    path = write_png(image_hw3, tmp_path / "rgb.png")
    assert _ihdr(path) == (4, 6, 8, PNG_RGB)
    read = read_png(path)
    assert read.shape == (6, 4, 3)
    np.testing.assert_array_equal(read, image_hw3)


@pytest.mark.parametrize(
    "array, message",
    [
        pytest.param(np.zeros((4, 4), np.float32), "uint8 or uint16", id="float32"),
        pytest.param(np.zeros((4, 4), np.float64), "uint8 or uint16", id="float64"),
        pytest.param(np.zeros((4, 4), np.int16), "uint8 or uint16", id="int16"),
        pytest.param(np.zeros((4, 4, 3), np.uint16), "colour", id="rgb-16bit"),
        pytest.param(np.zeros((4, 4, 4), np.uint8), "colour", id="rgba"),
        pytest.param(np.zeros((2, 4, 4, 3), np.uint8), "shape", id="4d"),
    ],
)
def test_write_refuses(tmp_path: Path, array: np.ndarray, message: str) -> None:
    path = tmp_path / "refused.png"
    with pytest.raises(ValueError, match=message) as info:
        write_png(array, path)
    assert str(path) in str(info.value)
    assert not path.exists()


def test_read_refuses_non_png(tmp_path: Path) -> None:
    path = tmp_path / "text.png"
    path.write_text("not an image")
    with pytest.raises(ImageReadError) as info:
        read_png(path)
    assert str(path) in str(info.value) and "expected a PNG" in str(info.value)
