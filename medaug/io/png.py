"""PNG out (and in, for tests and round trips): 8- or 16-bit grayscale images, 8-bit label maps, RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medaug.errors import ImageReadError
from medaug.io.atomic import atomic_output


def write_png(array_hw: np.ndarray, path: str | Path) -> Path:
    """Write an ``(H, W)`` uint8/uint16 image or an ``(H, W, 3)`` uint8 RGB image, atomically.

    Rows run top to bottom as displayed; callers decide the display orientation (for RAS slices,
    medaug shows anterior up and the patient's right on the viewer's left, the radiological view).
    """
    from PIL import Image

    array_hw = np.ascontiguousarray(array_hw)
    if array_hw.dtype.kind == "u" and not array_hw.dtype.isnative:
        array_hw = array_hw.astype(array_hw.dtype.newbyteorder("="))
    if array_hw.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: write_png takes uint8 or uint16, got {array_hw.dtype}")
    if array_hw.ndim not in (2, 3):
        raise ValueError(f"{path}: write_png takes (H, W) or (H, W, 3), got shape {array_hw.shape}")
    if array_hw.ndim == 3 and (array_hw.shape[2] != 3 or array_hw.dtype != np.uint8):
        raise ValueError(f"{path}: colour PNGs must be (H, W, 3) uint8, got {array_hw.shape} {array_hw.dtype}")
    image = Image.fromarray(array_hw)  # uint16 -> mode "I;16", read back as uint16
    with atomic_output(path) as temporary:
        image.save(temporary, format="PNG")
    return Path(path)


def read_png(path: str | Path) -> np.ndarray:
    """Read a PNG into ``(H, W)`` (grayscale, keeping 16 bits) or ``(H, W, C)``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.array(image)
            sixteen_bit = image.mode.startswith("I")  # PNG has no 32-bit gray: older Pillow says "I"
    except (OSError, UnidentifiedImageError) as error:
        raise ImageReadError(path, f"not a readable PNG ({error}); expected a PNG image file") from None
    return array.astype(np.uint16) if sixteen_bit else array
