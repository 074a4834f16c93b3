"""Acquisition effects applied to a piecewise-constant tissue image: blur, smooth variation, bias, noise.

All functions take and return float32 ``(I, J, K)`` arrays in the channel's own units (HU for CT,
arbitrary units for MR) and draw from the generator they are given.
"""

from __future__ import annotations

import numpy as np

from medaug.phantoms.geometry import smooth_field


def blur_mm(
    image_ijk: np.ndarray, spacing_mm: tuple[float, float, float], sigma_mm: tuple[float, float, float]
) -> np.ndarray:
    """Gaussian blur, per-axis sigma in mm (the scanner's point spread); axes under a quarter voxel are skipped."""
    from scipy.ndimage import gaussian_filter

    sigma_voxels = [s / d if s / d >= 0.25 else 0.0 for s, d in zip(sigma_mm, spacing_mm, strict=True)]
    if not any(sigma_voxels):
        return image_ijk
    return gaussian_filter(image_ijk, sigma=sigma_voxels, mode="nearest", truncate=3.0)


def add_smooth_variation(image_ijk: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """Add a low-frequency field of standard deviation ``std`` (same units as the image), in place."""
    image_ijk += np.float32(std) * smooth_field(rng, image_ijk.shape, (4, 4, 3), decay=1.0)
    return image_ijk


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """A multiplicative MR bias field ``exp(strength * f)`` (float32, positive), f a smooth unit-std field."""
    return np.exp(np.float32(strength) * smooth_field(rng, shape, (3, 3, 3), decay=1.0))


def add_gaussian_noise(image_ijk: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Add white Gaussian noise of standard deviation ``sigma`` (CT quantum noise), in place."""
    image_ijk += np.float32(sigma) * rng.standard_normal(image_ijk.shape, dtype=np.float32)
    return image_ijk


def rician(image_ijk: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise: ``|s + n_re + i n_im|`` (MR magnitude images)."""
    real = image_ijk + np.float32(sigma) * rng.standard_normal(image_ijk.shape, dtype=np.float32)
    imaginary = np.float32(sigma) * rng.standard_normal(image_ijk.shape, dtype=np.float32)
    return np.sqrt(real * real + imaginary * imaginary)


def to_int16(image_ijk: np.ndarray, low: float, high: float) -> np.ndarray:
    """Round and clip to ``[low, high]``, as int16 (what the scanner stores)."""
    return np.clip(np.rint(image_ijk), low, high).astype(np.int16)
