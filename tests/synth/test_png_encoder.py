"""The PNG encoder's bytes (``medaug.synth.export.png``) and the atomic writes under it, checked with zlib and
Pillow against exact arithmetic computed here, never with the encoder's own helpers."""

from __future__ import annotations

import struct
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medaug.io.atomic import PART_PREFIX
from medaug.prepare.intensity import IntensityMapping
from medaug.synth.export import ExportSlice, PngOptions, canonical_affine, export_batch, write_png_sample
from medaug.synth.export.base import write_bytes_atomic
from medaug.synth.export.png import model_to_uint16

T2 = IntensityMapping(kind="mr_percentile", low=47.0, high=1261.0, units="a.u.", percentiles=(0.5, 99.5))
ADC = IntensityMapping(kind="mr_percentile", low=117.27, high=2817.0, units="a.u.", percentiles=(0.5, 99.5))


def exact_uint16(model: np.ndarray) -> np.ndarray:
    """round((clip(m, -1, 1) + 1) / 2 * 65535), ties to even, in exact rational arithmetic."""
    def one(value: float) -> int:
        scaled = (min(max(Fraction(float(value)), Fraction(-1)), Fraction(1)) + 1) * Fraction(65535, 2)
        return round(scaled)  # Fraction rounds half to even
    return np.array([one(value) for value in model.ravel()], dtype=np.uint16).reshape(model.shape)


def model_values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 model values in [-1.5, 1.5], none with 0 < |m| < 2**-13 (below it float64 rounds the sum once
    before the integer rounding, as the formula's float64 evaluation has always done), plus -1, 0, +1."""
    model = rng.uniform(-1.5, 1.5, size=shape).astype(np.float32)
    model[np.abs(model) < 2.0**-13] = 0.25
    model.flat[:3] = [-1.0, 0.0, 1.0]
    return model


def mr_sample(shape: tuple[int, int], seed: int = 0) -> ExportSlice:
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    label[shape[0] // 4:shape[0] // 2, shape[1] // 3:] = 11
    label[shape[0] // 2:, :shape[1] // 2] = 12
    label[0, 0] = 255
    return ExportSlice(sample_id=f"mr{seed:04d}", image_CHW=model_values(rng, (2, *shape)), label_HW=label,
                       channels=("t2", "adc"), affine=canonical_affine(0.6, shape, slice_thickness_mm=3.6),
                       intensity=(T2, ADC), domain="mr/prostate")


def png_chunks(path: Path) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, after checking the signature and each chunk's CRC-32 with zlib."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(raw):
        length, kind = struct.unpack(">I4s", raw[offset:offset + 8])
        data = raw[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", raw[offset + 8 + length:offset + 12 + length])
        assert crc == zlib.crc32(kind + data), f"{path.name}: bad CRC in {kind!r}"
        chunks.append((kind, data))
        offset += 12 + length
    assert offset == len(raw) and chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    return chunks


def decoded_rows(path: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """IHDR fields, each row's filter byte, and the unfiltered row bytes (filters None and Up only)."""
    chunks = png_chunks(path)
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    stream = zlib.decompress(b"".join(data for kind, data in chunks if kind == b"IDAT"))  # checks Adler-32
    scanlines = np.frombuffer(stream, dtype=np.uint8).reshape(height, -1)
    filters, rows = scanlines[:, 0], scanlines[:, 1:].astype(np.int64)
    assert set(filters.tolist()) <= {0, 2}
    for row in range(1, height):
        if filters[row] == 2:  # Up: add the (decoded) byte above
            rows[row] = (rows[row] + rows[row - 1]) % 256
    return {"width": width, "height": height, "depth": depth, "colour": colour}, filters, rows.astype(np.uint8)


def test_model_to_uint16_is_the_exact_rounding():
    model = model_values(np.random.default_rng(5), (50, 40))
    expected = exact_uint16(model)
    np.testing.assert_array_equal(model_to_uint16(model), expected)
    np.testing.assert_array_equal(model_to_uint16(model, ">u2").astype(np.uint16), expected)
    assert model_to_uint16(model, ">u2").tobytes() == expected.astype(">u2").tobytes()


@pytest.mark.parametrize("shape", [(24, 20), (3, 1), (400, 200)], ids=["small", "tiny", "three-stored-blocks"])
@pytest.mark.parametrize("level", [None, 1])
def test_16bit_files_are_valid_pngs_holding_the_formula(tmp_path, shape, level):
    sample = mr_sample(shape)
    paths = write_png_sample(sample, tmp_path, PngOptions(compress_level=level))
    for channel, path in enumerate(paths[:2]):
        header, filters, rows = decoded_rows(path)
        assert header == {"width": shape[1], "height": shape[0], "depth": 16, "colour": 0}
        assert set(filters.tolist()) == ({0} if level is None else {2})
        expected = exact_uint16(sample.image_CHW[channel])
        np.testing.assert_array_equal(rows.view(">u2").astype(np.uint16), expected)
        with Image.open(path) as image:
            np.testing.assert_array_equal(np.array(image).astype(np.uint16), expected)
    if level is None and shape == (400, 200):  # stored: the size is the scanlines plus fixed framing
        idat = sum(len(data) for kind, data in png_chunks(paths[0]) if kind == b"IDAT")
        assert idat == 400 * 401 + 2 + 3 * 5 + 4  # zlib header, 3 stored blocks of <= 65,535 bytes, Adler-32


@pytest.mark.parametrize("level", [None, 1, 9])
def test_label_png_is_the_label_and_compressed(tmp_path, level):
    sample = mr_sample((64, 48))
    path = write_png_sample(sample, tmp_path, PngOptions(compress_level=level))[-1]
    header, _, rows = decoded_rows(path)
    assert header == {"width": 48, "height": 64, "depth": 8, "colour": 0}
    np.testing.assert_array_equal(rows, sample.label_HW)
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.array(image), sample.label_HW)
    assert path.stat().st_size < 64 * 49 // 4  # runs of 4 ids: far below the raw scanlines


def test_write_bytes_atomic_makes_the_folder_and_joins_the_pieces(tmp_path):
    target = tmp_path / "a" / "b" / "x.bin"
    pieces = [b"head", memoryview(np.arange(5, dtype=np.uint16)), b"", bytearray(b"tail")]
    write_bytes_atomic(target, pieces)
    assert target.read_bytes() == b"head" + np.arange(5, dtype=np.uint16).tobytes() + b"tail"
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(path.name for path in target.parent.iterdir()) == ["x.bin"]


def test_write_bytes_atomic_leaves_nothing_when_the_rename_fails(tmp_path):
    blocked = tmp_path / "x.png"
    (blocked / "inside").mkdir(parents=True)  # a non-empty folder where the file should go
    with pytest.raises(OSError):
        write_bytes_atomic(blocked, [b"bytes"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["x.png"] and blocked.is_dir()
    assert not [path for path in tmp_path.rglob(f"{PART_PREFIX}*")]


def test_export_batch_on_two_threads_raises_a_write_error_and_writes_the_rest(tmp_path):
    samples = [mr_sample((16, 12), seed) for seed in range(6)]
    (tmp_path / "png" / "mr0003_label.png" / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        export_batch(samples, tmp_path, ("png",), workers=2)
    for sample in samples:
        label = tmp_path / "png" / f"{sample.sample_id}_label.png"
        if sample.sample_id != "mr0003":
            with Image.open(label) as image:
                np.testing.assert_array_equal(np.array(image), sample.label_HW)
    assert not list((tmp_path / "png").glob(f"{PART_PREFIX}*"))
