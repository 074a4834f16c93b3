"""Geometry for the procedural phantoms: an axis-aligned RAS grid, implicit shapes, smooth random fields.

Every phantom is drawn in world millimetres (RAS+: +x patient's right, +y anterior, +z superior) on a
:class:`Grid` whose voxel axes point along +x, +y, +z, so world coordinates are separable per axis and
shapes are evaluated with broadcasting instead of full coordinate arrays. Shapes are evaluated only
inside the voxel box that covers them (:class:`Region`), which keeps a 512×512×40 CT well under a
second.

Random fields are sums of separable cosine (DCT-II) basis functions with random coefficients: the number
of coefficients depends only on the requested frequency count, never on the grid, so the same random
stream draws the same anatomy at any matrix size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Grid:
    """A voxel grid with axes along +x, +y, +z (RAS): voxel ``(i, j, k)`` sits at ``origin + (i, j, k) * spacing``."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """4×4 voxel → RAS mm affine (diagonal spacing, translation = origin)."""
        affine = np.diag([*self.spacing_mm, 1.0])
        affine[:3, 3] = self.origin_mm
        return affine

    def axis_mm(self, axis: int, index: slice = slice(None)) -> np.ndarray:
        """World coordinate (mm, float32) of each voxel centre along ``axis``, restricted to ``index``."""
        positions = np.arange(self.shape[axis], dtype=np.float64)[index]
        return (self.origin_mm[axis] + positions * self.spacing_mm[axis]).astype(np.float32)

    def coords(self, box: Box = (slice(None),) * 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x ``(n, 1, 1)``, y ``(1, m, 1)``, z ``(1, 1, l)`` world mm of the voxels in ``box``, for broadcasting."""
        x = self.axis_mm(0, box[0])[:, None, None]
        y = self.axis_mm(1, box[1])[None, :, None]
        z = self.axis_mm(2, box[2])[None, None, :]
        return x, y, z

    def box(self, low_mm: np.ndarray, high_mm: np.ndarray) -> Box | None:
        """The voxel box covering the world box ``[low, high]`` (mm), clipped to the grid; None if outside."""
        slices = []
        for axis in range(3):
            first = int(np.ceil((low_mm[axis] - self.origin_mm[axis]) / self.spacing_mm[axis]))
            last = int(np.floor((high_mm[axis] - self.origin_mm[axis]) / self.spacing_mm[axis]))
            first, last = max(first, 0), min(last, self.shape[axis] - 1)
            if first > last:
                return None
            slices.append(slice(first, last + 1))
        return tuple(slices)  # type: ignore[return-value]


def centred_grid(shape: tuple[int, int, int], fov_mm: tuple[float, float, float], centre_mm: np.ndarray) -> Grid:
    """A grid of ``shape`` voxels spanning ``fov_mm`` (spacing = fov / shape) centred on ``centre_mm``."""
    spacing = tuple(float(f) / n for f, n in zip(fov_mm, shape, strict=True))
    origin = tuple(float(c) - (n - 1) / 2 * s for c, n, s in zip(centre_mm, shape, spacing, strict=True))
    return Grid(shape=tuple(int(n) for n in shape), spacing_mm=spacing, origin_mm=origin)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Region:
    """A boolean mask ``(n, m, l)`` over the voxel box ``box`` of a grid."""

    box: Box
    mask: np.ndarray


def cosine_basis(length: int, n_basis: int) -> np.ndarray:
    """DCT-II basis ``(length, n_basis)``: column ``a`` is ``cos(pi * a * (i + 0.5) / length)``, float32."""
    positions = (np.arange(length, dtype=np.float64) + 0.5) / max(length, 1)
    frequencies = np.arange(n_basis, dtype=np.float64)
    return np.cos(np.pi * positions[:, None] * frequencies[None, :]).astype(np.float32)


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, int, int], n_basis: tuple[int, int, int], decay: float = 1.0
) -> np.ndarray:
    """A smooth random field ``shape`` (float32), zero mean and unit standard deviation over the box.

    It is ``sum_abc c_abc cos_a(i) cos_b(j) cos_c(k)`` over ``n_basis`` frequencies per axis (the
    constant term left out); ``c_abc ~ N(0, 1) / (1 + a² + b² + c²)^(decay / 2)``, so ``decay`` 0 gives
    band-limited white noise and larger values smoother fields. The highest frequency ``n`` has a
    half-wavelength of ``extent / n``. Coefficients are drawn before anything else, so the random stream
    advances by ``prod(n_basis)`` normals whatever the shape.
    """
    coefficients = rng.standard_normal(n_basis).astype(np.float32)  # (A, B, C)
    a, b, c = np.meshgrid(*(np.arange(n) for n in n_basis), indexing="ij")
    coefficients /= ((1.0 + a**2 + b**2 + c**2) ** (decay / 2)).astype(np.float32)
    coefficients[0, 0, 0] = 0.0
    basis_i, basis_j, basis_k = (cosine_basis(length, n) for length, n in zip(shape, n_basis, strict=True))
    by_k = np.einsum("abc,kc->abk", coefficients, basis_k)  # (A, B, K)
    by_jk = np.matmul(basis_j[None], by_k)  # (A, J, K)
    field = (basis_i @ by_jk.reshape(n_basis[0], -1)).reshape(shape)  # (I, J, K)
    return field / np.float32(_field_std(coefficients, shape, field))


def _field_std(coefficients: np.ndarray, shape: tuple[int, int, int], field: np.ndarray) -> float:
    """Standard deviation of a cosine-series field over its grid (its mean is 0: no constant term).

    The DCT-II basis is orthogonal on the grid (mean square 1 for frequency 0, 1/2 above), so the
    variance is a weighted sum of squared coefficients; where a frequency reaches the grid size the
    basis aliases and the field's own std is used.
    """
    if any(n > length for n, length in zip(coefficients.shape, shape, strict=True)):
        std = float(field.std(dtype=np.float64))
    else:
        weights = [np.where(np.arange(n) == 0, 1.0, 0.5) for n in coefficients.shape]
        mean_square = np.einsum("abc,a,b,c->", np.square(coefficients, dtype=np.float64), *weights)
        std = float(np.sqrt(mean_square))
    return std if std > 1e-12 else 1.0


def split_rng(rng: np.random.Generator, count: int) -> list[np.random.Generator]:
    """``count`` independent generators seeded from ``rng`` (what ``Generator.spawn`` does, on numpy < 1.25 too).

    Anatomy and noise draw from separate streams, so the noise (whose draw count depends on the matrix
    size) never shifts the anatomy.
    """
    return [np.random.default_rng(int(seed)) for seed in rng.integers(0, 2**63, size=count)]


def rotation_z(angle_rad: float) -> np.ndarray:
    """3×3 rotation about +z (superior) by ``angle_rad``, counter-clockwise seen from above."""
    cosine, sine = np.cos(angle_rad), np.sin(angle_rad)
    return np.array([[cosine, -sine, 0.0], [sine, cosine, 0.0], [0.0, 0.0, 1.0]])


def ellipsoid(
    grid: Grid,
    centre_mm: np.ndarray,
    semi_axes_mm: np.ndarray,
    *,
    angle_rad: float = 0.0,
    roughness: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Region | None:
    """Voxels inside an ellipsoid rotated by ``angle_rad`` about z, its surface perturbed by ``roughness``.

    The normalized radius ``r = |R^T (p - c) / s|`` is compared with ``1 + roughness * f`` where ``f`` is
    a smooth unit-std field over the ellipsoid's box (about two bumps per axis), so each draw is a
    different lumpy shape. Returns None when the ellipsoid misses the grid.
    """
    centre_mm = np.asarray(centre_mm, dtype=np.float64)
    semi_axes_mm = np.asarray(semi_axes_mm, dtype=np.float64)
    if roughness > 0.0 and rng is None:
        raise ValueError("ellipsoid: roughness > 0 needs a random generator")
    # One draw whether or not the shape meets the grid, so later shapes do not depend on the matrix size.
    shape_seed = int(rng.integers(2**63)) if roughness > 0.0 else 0
    rotation = rotation_z(angle_rad)
    reach = np.abs(rotation) @ semi_axes_mm * (1.0 + 3.0 * roughness)
    box = grid.box(centre_mm - reach, centre_mm + reach)
    if box is None:
        return None
    radius = normalized_radius(grid, box, centre_mm, semi_axes_mm, rotation)
    if roughness > 0.0:
        bumps = smooth_field(np.random.default_rng(shape_seed), radius.shape, (4, 4, 4), decay=1.0)
        return Region(box, radius < 1.0 + roughness * bumps)
    return Region(box, radius < 1.0)


def normalized_radius(
    grid: Grid, box: Box, centre_mm: np.ndarray, semi_axes_mm: np.ndarray, rotation: np.ndarray
) -> np.ndarray:
    """``|R^T (p - c) / s|`` for the voxels of ``box`` (float32, box shape); 1 on the ellipsoid surface."""
    # Offsets from the centre along x, y, z: (n, 1, 1), (1, m, 1), (1, 1, l).
    deltas = [axis_mm - np.float32(c) for axis_mm, c in zip(grid.coords(box), centre_mm, strict=True)]
    total = None
    for axis in range(3):
        # Only non-zero rotation entries: an axis-aligned ellipsoid sums three small broadcast terms.
        weights = rotation[:, axis]
        parts = [delta * np.float32(w) for delta, w in zip(deltas, weights, strict=True) if abs(w) > 1e-12]
        local = sum(parts[1:], parts[0])  # coordinate along the ellipsoid's axis
        term = np.square(local / np.float32(semi_axes_mm[axis]))
        total = term if total is None else total + term
    box_shape = np.broadcast_shapes(*(delta.shape for delta in deltas))
    return np.sqrt(np.broadcast_to(total, box_shape).astype(np.float32))


def tube(
    grid: Grid,
    centre_xy_mm: np.ndarray,
    semi_axes_xy_mm: np.ndarray,
    z_range_mm: tuple[float, float],
    slope_xy: tuple[float, float] = (0.0, 0.0),
) -> Region | None:
    """An elliptic cylinder along z: cross-section semi-axes ``(a, b)`` mm, centre moving ``slope_xy`` mm per mm of z.

    The centre at height ``z`` is ``centre_xy + slope_xy * z`` (world mm).
    """
    low_z, high_z = z_range_mm
    reach_xy = np.asarray(semi_axes_xy_mm) + np.abs(slope_xy) * max(abs(low_z), abs(high_z))
    low = np.array([centre_xy_mm[0] - reach_xy[0], centre_xy_mm[1] - reach_xy[1], low_z])
    high = np.array([centre_xy_mm[0] + reach_xy[0], centre_xy_mm[1] + reach_xy[1], high_z])
    box = grid.box(low, high)
    if box is None:
        return None
    x, y, z = grid.coords(box)
    centre_x = np.float32(centre_xy_mm[0]) + np.float32(slope_xy[0]) * z
    centre_y = np.float32(centre_xy_mm[1]) + np.float32(slope_xy[1]) * z
    inside = np.square((x - centre_x) / np.float32(semi_axes_xy_mm[0])) + np.square(
        (y - centre_y) / np.float32(semi_axes_xy_mm[1])
    )
    return Region(box, inside < 1.0)


def full_region(grid: Grid, mask: np.ndarray) -> Region:
    """A Region over the whole grid from a full-size (or broadcastable) boolean mask."""
    return Region((slice(None),) * 3, np.broadcast_to(mask, grid.shape))  # type: ignore[arg-type]
