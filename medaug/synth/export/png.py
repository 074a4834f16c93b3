"""PNG export: one grayscale PNG per channel, a label PNG, and a montage with mask overlays.

Files, per sample, in the output folder: ``{sample_id}_{channel}.png`` for each channel and
``{sample_id}_label.png``.

* **16-bit channels** (default): ``v = round((m + 1) / 2 * 65535)`` for the model value ``m`` clipped to
  [-1, 1], so -1 → 0 and +1 → 65535; a reader returns to source units with
  ``source = (v / 65535 * 2 - 1) * scale + offset`` (the channel's intensity mapping, also written into the
  PNG's ``Description`` text chunk).
* **8-bit windowed channels** (``bits=8``): source units first (``m * scale + offset``: HU for CT, a.u.
  for MR), then the linear window ``v = round(clip((s - (c - w / 2)) / w, 0, 1) * 255)`` for the window
  centre ``c`` and width ``w`` in source units (``window``; by default each channel's own mapping range,
  which is the domain window for CT).
* **Labels**: 8-bit vocabulary ids as stored (0 background, 255 ignore; ``medaug/vocab.py``).
* **Orientation**: PNG rows are slice rows and PNG columns slice columns, the radiological view: for
  axial slices anterior is up and the patient's right is on the viewer's left.

Why a small encoder here instead of Pillow (``benchmarks/export.py``, 2-core sandbox, 256² slices with
labels): Pillow's PNG writer took 2.4 ms for one uint16 image even at ``compress_level=0`` (its per-row
filter search) and wrote 137 CT / 21 MR (2-channel) slices/s; :func:`png_buffers` (numpy scanlines +
``zlib``, pieces written with ``writev``) writes 1,730 / 1,088. Compression is a size/speed trade: at zlib
level 1 the 16-bit files were 64 % (CT, flat air) and 23 % (MR) smaller but export ran at 979 / 293
slices/s, since zlib runs at about 50 MB/s here on the noisy low byte of 16-bit data. So 16-bit channels
are stored (deflate level 0, still a standard PNG) by default, to meet the 1,000 slices/s export target;
labels and 8-bit channels compress well and fast at level 1. ``compress_level`` overrides both.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medaug.synth.export.base import LABEL_NAME, ExportError, ExportSlice, write_bytes_atomic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GRAY, _RGB = 0, 2  # IHDR colour types
_FILTER_NONE, _FILTER_UP = 0, 2  # PNG scanline filter types
UINT16_MAX = 65535
DEFAULT_LEVEL_16BIT = 0  # stored: zlib on 16-bit data slows export 2-4x (module docstring)
DEFAULT_LEVEL_8BIT = 1
MONTAGE_GAP = 2  # black pixels between montage tiles

Window = tuple[float, float]  # (centre, width) in source units


@dataclass(frozen=True)
class PngOptions:
    """How channels become PNG pixels (module docstring for the formulas).

    Attributes:
        bits: 16 (linear over model space) or 8 (windowed in source units).
        window: 8-bit only: (centre, width) in source units for every channel, or a dict channel name →
            (centre, width); channels without one use their own mapping range (CT: the domain window).
        compress_level: zlib level 0-9 for every file; None: 0 for 16-bit channels, 1 for 8-bit and labels.
    """

    bits: Literal[8, 16] = 16
    window: Window | Mapping[str, Window] | None = None
    compress_level: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (8, 16):
            raise ExportError("png.bits", f"is {self.bits!r}; expected 8 or 16")
        if self.window is not None and self.bits != 8:
            raise ExportError("png.window", "applies to 8-bit PNGs; expected bits=8 with a window")
        for centre_width in _window_values(self.window):
            if len(centre_width) != 2 or not float(centre_width[1]) > 0:
                raise ExportError("png.window", f"is {centre_width!r}; expected (centre, width > 0) in source units")
        if self.compress_level is not None and self.compress_level not in range(10):
            raise ExportError("png.compress_level", f"is {self.compress_level!r}; expected 0..9")

    def level(self, bits: int) -> int:
        """The zlib level for a file of ``bits`` per pixel."""
        if self.compress_level is not None:
            return self.compress_level
        return DEFAULT_LEVEL_16BIT if bits == 16 else DEFAULT_LEVEL_8BIT


def _window_values(window: Window | Mapping[str, Window] | None) -> list[Window]:
    if window is None:
        return []
    return list(window.values()) if isinstance(window, Mapping) else [window]


def model_to_uint16(model_HW: np.ndarray) -> np.ndarray:
    """(H, W) uint16: ``round((clip(m, -1, 1) + 1) / 2 * 65535)``.

    Computed as ``clip(m * 32767.5 + 32767.5, 0, 65535)`` in float64, in place: for float32 ``m`` every step
    is exact (a 24-bit by 17-bit product), so ties round as the formula says.
    """
    half = UINT16_MAX / 2.0
    scaled_HW = np.multiply(model_HW, half, dtype=np.float64)
    scaled_HW += half
    np.clip(scaled_HW, 0.0, float(UINT16_MAX), out=scaled_HW)
    return np.rint(scaled_HW, out=scaled_HW).astype(np.uint16)


def window_to_uint8(source_HW: np.ndarray, centre: float, width: float) -> np.ndarray:
    """(H, W) uint8: ``round(clip((s - (centre - width / 2)) / width, 0, 1) * 255)``, ``s`` in source units."""
    fraction_HW = np.subtract(source_HW, centre - width / 2.0, dtype=np.float64)
    fraction_HW /= width
    np.clip(fraction_HW, 0.0, 1.0, out=fraction_HW)
    fraction_HW *= 255.0
    return np.rint(fraction_HW, out=fraction_HW).astype(np.uint8)


def channel_window(sample: ExportSlice, channel: int, options: PngOptions) -> Window:
    """The (centre, width) of channel ``channel``: the option's, or the channel mapping's own range."""
    window = options.window
    if isinstance(window, Mapping):
        window = window.get(sample.channels[channel])
    if window is not None:
        return float(window[0]), float(window[1])
    mapping = sample.intensity[channel]
    return (mapping.low + mapping.high) / 2.0, mapping.high - mapping.low


def encode_png(array_HW: np.ndarray, compress_level: int = DEFAULT_LEVEL_8BIT,
               text: Mapping[str, str] | None = None) -> bytes:
    """A PNG file's bytes for an (H, W) uint8/uint16 gray or (H, W, 3) uint8 RGB image (:func:`png_buffers`)."""
    return b"".join(png_buffers(array_HW, compress_level, text))


def png_buffers(array_HW: np.ndarray, compress_level: int = DEFAULT_LEVEL_8BIT,
                text: Mapping[str, str] | None = None) -> list[bytes]:
    """A PNG file as consecutive pieces (joined, they are the file; written as they are, nothing is copied).

    Scanlines are unfiltered when stored (level 0) and use the "Up" filter when compressed (it turns
    smooth and flat regions into zero runs). ``text`` becomes tEXt chunks (Latin-1 keywords and values).
    """
    array_HW = np.asarray(array_HW)
    if array_HW.dtype not in (np.uint8, np.uint16) or array_HW.ndim not in (2, 3) or \
            (array_HW.ndim == 3 and (array_HW.shape[2] != 3 or array_HW.dtype != np.uint8)):
        raise ExportError("png", f"cannot encode {array_HW.dtype} {array_HW.shape}; expected (H, W) uint8/uint16 "
                          "or (H, W, 3) uint8")
    height, width = array_HW.shape[:2]
    scanlines_HB = _scanlines(array_HW, filtered=compress_level > 0)
    colour = _GRAY if array_HW.ndim == 2 else _RGB
    header = struct.pack(">IIBBBBB", width, height, array_HW.dtype.itemsize * 8, colour, 0, 0, 0)
    pieces = [PNG_SIGNATURE, *_chunk(b"IHDR", header)]
    for key, value in (text or {}).items():
        pieces += _chunk(b"tEXt", f"{key}\0{value}".encode("latin-1", "replace"))
    pieces += _chunk(b"IDAT", zlib.compress(scanlines_HB.data, compress_level))
    return pieces + _chunk(b"IEND", b"")


def _scanlines(array_HW: np.ndarray, filtered: bool) -> np.ndarray:
    """(H, 1 + bytes per row) uint8: each row's filter byte, then its big-endian bytes (Up-filtered if asked)."""
    height = array_HW.shape[0]
    scanlines_HB = np.empty((height, array_HW[0].nbytes + 1), dtype=np.uint8)
    scanlines_HB[:, 0] = _FILTER_UP if filtered else _FILTER_NONE
    rows_HB = scanlines_HB[:, 1:]
    if array_HW.dtype == np.uint16:
        rows_HB.view(">u2")[...] = array_HW  # byte swap while copying
    else:
        rows_HB[...] = array_HW.reshape(height, -1)
    if filtered:
        np.subtract(rows_HB[1:], rows_HB[:-1], out=rows_HB[1:])  # Up: byte minus the byte above, mod 256
    return scanlines_HB


def _chunk(kind: bytes, data: bytes) -> list[bytes]:
    """A PNG chunk as pieces: length and type, data, CRC of type and data."""
    crc = zlib.crc32(data, zlib.crc32(kind))
    return [struct.pack(">I", len(data)) + kind, data, struct.pack(">I", crc)]


def png_paths(sample_id: str, channels: Sequence[str], folder: Path) -> list[Path]:
    """The files of one sample: one per channel, then the label."""
    return [folder / f"{sample_id}_{name}.png" for name in (*channels, LABEL_NAME)]


def write_png_sample(sample: ExportSlice, folder: str | Path, options: PngOptions = PngOptions()) -> list[Path]:
    """Write the sample's channel PNGs and label PNG atomically (module docstring); returns the paths."""
    paths = png_paths(sample.sample_id, sample.channels, Path(folder))
    for channel, path in enumerate(paths[:-1]):
        pixels_HW, description = _channel_pixels(sample, channel, options)
        text = {"Software": "medaug", "Description": description}
        write_bytes_atomic(path, png_buffers(pixels_HW, options.level(pixels_HW.itemsize * 8), text))
    label_description = f"{_provenance(sample)}; vocabulary ids, 0 background, 255 ignore"
    label_text = {"Software": "medaug", "Description": label_description}
    write_bytes_atomic(paths[-1], png_buffers(sample.label_HW, options.level(8), label_text))
    return paths


def _channel_pixels(sample: ExportSlice, channel: int, options: PngOptions) -> tuple[np.ndarray, str]:
    """The channel's PNG pixels and the text that says how to read them back."""
    mapping = sample.intensity[channel]
    name = sample.channels[channel]
    if options.bits == 16:
        formula = (f"16-bit v = round((m + 1) / 2 * 65535), m in [-1, 1]; source = m * {mapping.scale:.9g} + "
                   f"{mapping.offset:.9g} {mapping.units}")
        return model_to_uint16(sample.image_CHW[channel]), f"{_provenance(sample)}; channel {name}; {formula}"
    centre, width = channel_window(sample, channel, options)
    formula = f"8-bit window centre {centre:.9g} width {width:.9g} {mapping.units}"
    pixels_HW = window_to_uint8(sample.source_HW(channel), centre, width)
    return pixels_HW, f"{_provenance(sample)}; channel {name}; {formula}"


def _provenance(sample: ExportSlice) -> str:
    kind = "synthetic" if sample.synthetic else "real"
    return f"{kind} {sample.domain or 'slice'} {sample.sample_id}"


def write_montage(samples: Sequence[ExportSlice], path: str | Path, columns: int = 8, channel: int = 0) -> Path:
    """One RGB PNG: a grid of ``channel`` of each sample (model space as gray) with its mask overlaid.

    Tiles are ``overlay_rgb`` pictures (vocabulary colours, ``medaug.prepare.inspect``) in sample order,
    row by row, ``columns`` per row, separated by ``MONTAGE_GAP`` black pixels; a sample without that channel
    shows its first. Shape: ``(rows * (H + gap) - gap, columns' * (W + gap) - gap, 3)`` for the largest
    H, W, with ``columns' = min(columns, len(samples))``. Written atomically.
    """
    from medaug.io.png import write_png
    from medaug.prepare.inspect import overlay_rgb

    if not samples or columns < 1:
        raise ExportError(path, f"{len(samples)} samples, {columns} columns; expected at least one of each")
    height = max(sample.image_CHW.shape[1] for sample in samples)
    width = max(sample.image_CHW.shape[2] for sample in samples)
    columns = min(columns, len(samples))
    rows = -(-len(samples) // columns)
    canvas_HW3 = np.zeros((rows * (height + MONTAGE_GAP) - MONTAGE_GAP,
                           columns * (width + MONTAGE_GAP) - MONTAGE_GAP, 3), dtype=np.uint8)
    for number, sample in enumerate(samples):
        image_HW = sample.image_CHW[channel if channel < len(sample.channels) else 0]
        tile_HW3 = overlay_rgb(image_HW, sample.label_HW)
        top, left = (number // columns) * (height + MONTAGE_GAP), (number % columns) * (width + MONTAGE_GAP)
        canvas_HW3[top:top + tile_HW3.shape[0], left:left + tile_HW3.shape[1]] = tile_HW3
    return write_png(canvas_HW3, path)
