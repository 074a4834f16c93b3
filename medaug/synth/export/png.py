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
labels, to tmpfs): Pillow's PNG writer took 2.4 ms for one uint16 image even at ``compress_level=0`` (its
per-row filter search) and wrote 133 CT / 18 MR (2-channel) slices/s; this encoder writes 1,511 / 1,115
(1,963 / 1,041 on one thread). Six runs alternating it with its previous version (``zlib.compress``'s copy
of every byte, a strided byte swap, Up-filtered labels, ``atomic_output``) gave MR 807-1,231 against 604-820
and CT 1,184-1,950 against 958-1,341 slices/s (run medians; the shared sandbox varies by up to ±30 % between
runs). Compression is a size/speed trade: at zlib level 1 the 16-bit files are 64 % (CT, flat air) and 23 %
(MR) smaller but export runs at 503 / 83 slices/s, since zlib runs at about 50 MB/s here on the noisy low
byte of 16-bit data. So 16-bit channels are stored (deflate level 0, still a standard PNG) by default;
labels (unfiltered, zlib level 1 with ``Z_RLE``: runs of one id along a row; about 2× smaller and 15 %
faster than the Up filter with zlib's default strategy) and 8-bit channels (Up filter, level 1) compress
well and fast. ``compress_level`` overrides all of them (labels then use the default strategy).

Where an MR sample's time goes (CPU time on one thread, about 0.8 ms for two 131 kB channel files and a
label; 1.15 ms before): the 16-bit values of both channels at once, ~0.2 ms (float64 scaling and rounding,
then one cast to big-endian ``>u2``, which numpy vectorises when contiguous, unlike the strided byte swap
into the scanline rows it replaced); Adler-32 and CRC-32 of the two streams, ~0.15 ms (zlib, about 3 GB/s
each); the three atomic writes, ~0.25 ms (mostly the kernel's page allocation and copy for tmpfs); the
label, ~0.1 ms; Python (paths, text chunks, framing, the batch loop), ~0.1 ms. A stored stream is not made
by ``zlib.compress(data, 0)``, which copies every byte into its output: its blocks are slices of the
scanline buffer between 5-byte headers (:func:`_zlib_stored`), and all pieces go to one ``writev`` as they
are. Two threads do not beat one on this sandbox (nor do two processes): its two vCPUs give this
memory-bound work about one core's throughput, so the CPU time per slice sets the rate
(``medaug.synth.export.batch``).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medaug.synth.export.base import LABEL_NAME, Buffer, ExportError, ExportSlice, write_bytes_atomic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GRAY, _RGB = 0, 2  # IHDR colour types
_FILTER_NONE, _FILTER_UP = 0, 2  # PNG scanline filter types
UINT16_MAX = 65535
DEFAULT_LEVEL_16BIT = 0  # stored: zlib on 16-bit data slows export 2-4x (module docstring)
DEFAULT_LEVEL_8BIT = 1
LABEL_STRATEGY = zlib.Z_RLE  # label maps at the default level: runs of one id (module docstring)
_ZLIB_STORED_HEADER = b"\x78\x01"  # deflate, 32 kB window, no dictionary, "fastest" (what zlib writes at level 0)
_STORED_BLOCK = 65535  # most bytes in one stored deflate block
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


def model_to_uint16(model_HW: np.ndarray, dtype: str | np.dtype = np.uint16) -> np.ndarray:
    """(..., H, W) 16-bit: ``round((clip(m, -1, 1) + 1) / 2 * 65535)``, ties to even, for model values ``m``.

    Computed as ``rint(clip(m, -1, 1) * 32767.5 + 32767.5)`` in float64: for float32 ``m`` the product is exact
    (24 by 16 significant bits), and clipping ``m`` first (in its own dtype, half the bytes) gives the values
    of clipping the scaled ones to [0, 65535] (checked for all 2**32 float32 bit patterns). ``dtype`` is any
    unsigned 16-bit type: ``">u2"`` gives a PNG's big-endian bytes in the same cast (numpy's contiguous
    byte-swapping cast is vectorised, its strided one is not).
    """
    half = UINT16_MAX / 2.0
    scaled_HW = np.multiply(np.clip(model_HW, -1.0, 1.0), half, dtype=np.float64)  # clip keeps float32 as float32
    scaled_HW += half
    np.rint(scaled_HW, out=scaled_HW)
    return scaled_HW.astype(dtype)


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
                text: Mapping[str, str] | None = None, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> list[Buffer]:
    """A PNG file as consecutive pieces (joined, they are the file; written as they are, nothing is copied).

    Scanlines use the "Up" filter when compressed (it turns smooth and flat regions into zero runs), except
    with ``strategy`` ``zlib.Z_RLE`` (for label maps: runs of one id along a row compress best as they are),
    and are unfiltered when stored (level 0). ``text`` becomes tEXt chunks (Latin-1 keywords and values).
    """
    array_HW = np.asarray(array_HW)
    if array_HW.dtype not in (np.uint8, np.uint16) or array_HW.ndim not in (2, 3) or \
            (array_HW.ndim == 3 and (array_HW.shape[2] != 3 or array_HW.dtype != np.uint8)):
        raise ExportError("png", f"cannot encode {array_HW.dtype} {array_HW.shape}; expected (H, W) uint8/uint16 "
                          "or (H, W, 3) uint8")
    scanlines_HB = _scanlines(array_HW, filtered=compress_level > 0 and strategy != zlib.Z_RLE)
    colour = _GRAY if array_HW.ndim == 2 else _RGB
    header = _image_header(array_HW.shape, array_HW.dtype.itemsize * 8, colour)
    return _png_pieces(scanlines_HB, header, compress_level, text, strategy)


def model_scanlines(model_CHW: np.ndarray, filtered: bool = False) -> np.ndarray:
    """(C, H, 1 + 2W) uint8: each channel's 16-bit PNG scanlines (:func:`model_to_uint16`), all channels at once.

    Each row: its filter byte, then the big-endian values (Up-filtered if ``filtered``).
    """
    channels, height, width = model_CHW.shape
    scanlines_CHB = np.empty((channels, height, 2 * width + 1), dtype=np.uint8)
    bytes_CHB = model_to_uint16(model_CHW, ">u2").view(np.uint8).reshape(channels, height, 2 * width)  # (C, H, 2W)
    scanlines_CHB[..., 1:] = bytes_CHB
    _filter_scanlines(scanlines_CHB, filtered)
    return scanlines_CHB


def _image_header(shape: tuple[int, ...], bit_depth: int, colour: int) -> bytes:
    """IHDR data: width, height, bit depth, colour type, deflate, adaptive filtering, no interlace."""
    return struct.pack(">IIBBBBB", shape[1], shape[0], bit_depth, colour, 0, 0, 0)


def _png_pieces(scanlines_HB: np.ndarray, header: bytes, compress_level: int, text: Mapping[str, str] | None,
                strategy: int = zlib.Z_DEFAULT_STRATEGY) -> list[Buffer]:
    """Signature, IHDR, tEXt, one IDAT (stored: the scanlines themselves between block headers), IEND."""
    head = PNG_SIGNATURE + _chunk(b"IHDR", header)
    for key, value in (text or {}).items():
        head += _chunk(b"tEXt", f"{key}\0{value}".encode("latin-1", "replace"))
    if compress_level == 0:
        idat = _zlib_stored(scanlines_HB.data.cast("B"))
    else:
        compressor = zlib.compressobj(compress_level, zlib.DEFLATED, zlib.MAX_WBITS, 8, strategy)
        idat = [compressor.compress(scanlines_HB.data) + compressor.flush()]
    crc = zlib.crc32(b"IDAT")
    for piece in idat:
        crc = zlib.crc32(piece, crc)
    head += struct.pack(">I", sum(len(piece) for piece in idat)) + b"IDAT"
    return [head, *idat, struct.pack(">I", crc) + _IEND_CHUNK]


def _zlib_stored(data: memoryview) -> list[Buffer]:
    """A zlib stream of stored deflate blocks holding ``data``, as pieces (the data's are slices of it, no copy).

    What ``zlib.compress(data, 0)`` writes, without its copy of every byte: header, blocks of at most 65,535
    bytes (each after its 5-byte header: final flag, length, one's complement of the length; little-endian),
    Adler-32 of the data (big-endian).
    """
    pieces: list[Buffer] = []
    total = len(data)
    for start in range(0, total, _STORED_BLOCK):
        block = data[start:start + _STORED_BLOCK]
        final = start + _STORED_BLOCK >= total
        pieces += [struct.pack("<BHH", final, len(block), len(block) ^ 0xFFFF), block]
    if not pieces:  # no data: one empty final block
        pieces.append(struct.pack("<BHH", 1, 0, 0xFFFF))
    pieces[0] = _ZLIB_STORED_HEADER + pieces[0]
    return [*pieces, struct.pack(">I", zlib.adler32(data))]


def _scanlines(array_HW: np.ndarray, filtered: bool) -> np.ndarray:
    """(H, 1 + bytes per row) uint8: each row's filter byte, then its big-endian bytes (Up-filtered if asked)."""
    height = array_HW.shape[0]
    scanlines_HB = np.empty((height, array_HW[0].nbytes + 1), dtype=np.uint8)
    rows_HB = scanlines_HB[:, 1:]
    if array_HW.dtype == np.uint16:
        rows_HB[...] = array_HW.astype(">u2").view(np.uint8).reshape(height, -1)  # big-endian bytes, (H, 2W)
    else:
        rows_HB[...] = array_HW.reshape(height, -1)
    _filter_scanlines(scanlines_HB, filtered)
    return scanlines_HB


def _filter_scanlines(scanlines_HB: np.ndarray, filtered: bool) -> None:
    """Set each row's filter byte and, if ``filtered``, Up-filter the rows' bytes, in place; (..., H, B) uint8."""
    scanlines_HB[..., 0] = _FILTER_UP if filtered else _FILTER_NONE
    if filtered:
        rows_HB = scanlines_HB[..., 1:]
        np.subtract(rows_HB[..., 1:, :], rows_HB[..., :-1, :], out=rows_HB[..., 1:, :])  # minus the byte above, mod 256


def _chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


_IEND_CHUNK = _chunk(b"IEND", b"")


def png_paths(sample_id: str, channels: Sequence[str], folder: Path) -> list[Path]:
    """The files of one sample: one per channel, then the label."""
    return [folder / f"{sample_id}_{name}.png" for name in (*channels, LABEL_NAME)]


def write_png_sample(sample: ExportSlice, folder: str | Path, options: PngOptions = PngOptions()) -> list[Path]:
    """Write the sample's channel PNGs and label PNG atomically (module docstring); returns the paths."""
    paths = png_paths(sample.sample_id, sample.channels, Path(folder))
    write_png_files(sample, paths, options)
    return paths


def write_png_files(sample: ExportSlice, paths: Sequence[Path], options: PngOptions = PngOptions()) -> None:
    """Write the sample's PNGs, each atomically, to ``paths`` as :func:`png_paths` gives them (channels, label)."""
    for path, pieces in zip(paths[:-1], _channel_pngs(sample, options)):
        write_bytes_atomic(path, pieces)
    label_description = f"{_provenance(sample)}; vocabulary ids, 0 background, 255 ignore"
    label_text = {"Software": "medaug", "Description": label_description}
    strategy = LABEL_STRATEGY if options.compress_level is None else zlib.Z_DEFAULT_STRATEGY
    write_bytes_atomic(paths[-1], png_buffers(sample.label_HW, options.level(8), label_text, strategy))


def _channel_pngs(sample: ExportSlice, options: PngOptions) -> list[list[Buffer]]:
    """Each channel's PNG file as pieces, with the text that says how to read its pixels back."""
    level = options.level(options.bits)
    files = []
    if options.bits == 16:
        scanlines_CHB = model_scanlines(sample.image_CHW, filtered=level > 0)
        header = _image_header(sample.image_CHW.shape[1:], 16, _GRAY)
        for channel, mapping in enumerate(sample.intensity):
            formula = (f"16-bit v = round((m + 1) / 2 * 65535), m in [-1, 1]; source = m * {mapping.scale:.9g} + "
                       f"{mapping.offset:.9g} {mapping.units}")
            files.append(_png_pieces(scanlines_CHB[channel], header, level, _channel_text(sample, channel, formula)))
        return files
    for channel, mapping in enumerate(sample.intensity):
        centre, width = channel_window(sample, channel, options)
        formula = f"8-bit window centre {centre:.9g} width {width:.9g} {mapping.units}"
        pixels_HW = window_to_uint8(sample.source_HW(channel), centre, width)
        files.append(png_buffers(pixels_HW, level, _channel_text(sample, channel, formula)))
    return files


def _channel_text(sample: ExportSlice, channel: int, formula: str) -> dict[str, str]:
    description = f"{_provenance(sample)}; channel {sample.channels[channel]}; {formula}"
    return {"Software": "medaug", "Description": description}


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
