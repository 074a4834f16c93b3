"""MR brain phantom: co-registered FLAIR and post-contrast T1 (T1c) of a head with a glioma-like tumour.

Geometry (default matrix 176×208×176): 1 mm isotropic (the field of view is fixed at 176×208×176 mm,
so another matrix changes the voxel size, not the anatomy), voxel axes along RAS +x, +y, +z.

Anatomy, each part drawn from the seed: scalp, skull (cortical tables around fatty diploë), the
subarachnoid CSF layer, the brain with a folded cortex (grey matter along the surface and along sulci
traced by the zero set of a band-limited random field), white matter beneath, deep grey nuclei, lateral
ventricles and the interhemispheric fissure (CSF), and a tumour in one hemisphere: a necrotic centre,
an enhancing rim around it and edema around that (the three nest: necrosis ⊂ enhancing region ⊂ edema
region, with at least one voxel of the outer part around every voxel of the inner one).

Intensities (arbitrary units): FLAIR: CSF 40–80, grey matter 380–440, white matter 300–350, edema
650–800 (bright), enhancing 520–650, necrosis 250–400, scalp 350–450, bone 20–50. T1c: CSF 80–130,
grey matter 330–380, white matter 430–480, edema 280–330, enhancing rim 850–1000 (bright), necrosis
120–180, scalp 700–850, diploë 400–550. Then a small blur, a bias field per channel (strength
0.05–0.15), Rician noise (sigma 8–20), rounding to int16 in [0, 32767].

Label ids (phantom-local, see ``recipes/datasets/phantom_mr_brain.yaml``): 1 skull, 2 csf,
3 brain_grey_matter, 4 brain_white_matter, 5 brain_tumor_edema, 6 brain_tumor_enhancing,
7 brain_tumor_necrosis. Scalp and air are 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medaug.phantoms.base import DomainSpec, PhantomArrays
from medaug.phantoms.geometry import (
    Box,
    Grid,
    Region,
    centred_grid,
    ellipsoid,
    full_region,
    normalized_radius,
    smooth_field,
    split_rng,
)
from medaug.phantoms.imaging import bias_field, blur_mm, rician, to_int16
from medaug.phantoms.tissues import (
    Tissue,
    TissueTable,
    labels_from_tissues,
    paint,
    render_channel,
)

LABELS = {
    1: "skull",
    2: "csf",
    3: "brain_grey_matter",
    4: "brain_white_matter",
    5: "brain_tumor_edema",
    6: "brain_tumor_enhancing",
    7: "brain_tumor_necrosis",
}

TISSUES = TissueTable(
    [
        Tissue("air", 0, {"flair": (0.0, 5.0), "t1c": (0.0, 5.0)}),
        Tissue("scalp", 0, {"flair": (350.0, 450.0), "t1c": (700.0, 850.0)}),
        Tissue("cortical_bone", 1, {"flair": (20.0, 50.0), "t1c": (30.0, 60.0)}),
        Tissue("diploe", 1, {"flair": (150.0, 250.0), "t1c": (400.0, 550.0)}),
        Tissue("csf", 2, {"flair": (40.0, 80.0), "t1c": (80.0, 130.0)}),
        Tissue("grey_matter", 3, {"flair": (380.0, 440.0), "t1c": (330.0, 380.0)}),
        Tissue("deep_grey_matter", 3, {"flair": (360.0, 420.0), "t1c": (360.0, 400.0)}),
        Tissue("white_matter", 4, {"flair": (300.0, 350.0), "t1c": (430.0, 480.0)}),
        Tissue("edema", 5, {"flair": (650.0, 800.0), "t1c": (280.0, 330.0)}),
        Tissue("enhancing", 6, {"flair": (520.0, 650.0), "t1c": (850.0, 1000.0)}),
        Tissue("necrosis", 7, {"flair": (250.0, 400.0), "t1c": (120.0, 180.0)}),
    ]
)

PARENCHYMA = TISSUES.select("grey_matter", "deep_grey_matter", "white_matter")
FOV_MM = (176.0, 208.0, 176.0)
# Cortical folding: a unit-std field with a flat spectrum up to a half-wavelength of 11 mm. The mean square
# of each axis' wavenumber is (pi / 11)² / 3, so the RMS gradient is about pi / 11 ≈ 0.28 per mm and
# |f| / 0.28 approximates the distance (mm) to the field's zero set, which traces the sulci.
FOLD_HALF_WAVELENGTH_MM = 11.0
FOLD_GRADIENT_PER_MM = 0.28


@dataclass(frozen=True)
class Head:
    """Concentric shells (mm): the scalp surface ellipsoid and the thickness of each layer inside it."""

    centre: np.ndarray  # (3,)
    semi: np.ndarray  # (3,) scalp surface
    scalp: float
    skull: float
    csf: float

    def brain_semi(self) -> np.ndarray:
        return self.semi - (self.scalp + self.skull + self.csf)


def build_mr_brain(rng: np.random.Generator, shape: tuple[int, int, int]) -> PhantomArrays:
    """Draw one MR brain phantom (channels flair, t1c) on a grid of ``shape`` voxels."""
    anatomy_rng, noise_rng = split_rng(rng, 2)
    grid = centred_grid(shape, FOV_MM, anatomy_rng.uniform(-3, 3, size=3))
    head = _draw_head(anatomy_rng)
    tissue_ijk = np.zeros(shape, dtype=np.uint8)
    _paint_shells(tissue_ijk, grid, head)
    _paint_cortex(tissue_ijk, grid, head, anatomy_rng)
    _paint_deep_structures(tissue_ijk, grid, head, anatomy_rng)
    _paint_tumour(tissue_ijk, grid, head, anatomy_rng)
    channels = [
        _mr_channel(tissue_ijk, grid, channel_rng, name)
        for name, channel_rng in zip(("flair", "t1c"), split_rng(noise_rng, 2), strict=True)
    ]
    return PhantomArrays(np.stack(channels), labels_from_tissues(tissue_ijk, TISSUES), grid)


def _draw_head(rng: np.random.Generator) -> Head:
    return Head(
        centre=np.array([rng.uniform(-3, 3), rng.uniform(-5, 5), rng.uniform(-35, -25)]),
        semi=np.array([rng.uniform(72, 80), rng.uniform(92, 100), rng.uniform(100, 110)]),
        scalp=rng.uniform(4, 7),
        skull=rng.uniform(5, 8),
        csf=rng.uniform(1.5, 3.0),
    )


def _paint_shells(tissue_ijk: np.ndarray, grid: Grid, head: Head) -> None:
    """Scalp, skull (outer table, diploë, inner table), subarachnoid CSF, then brain (white matter for now)."""
    shells = [
        ("scalp", 0.0),
        ("cortical_bone", head.scalp),
        ("diploe", head.scalp + 0.3 * head.skull),
        ("cortical_bone", head.scalp + 0.7 * head.skull),
        ("csf", head.scalp + head.skull),
        ("white_matter", head.scalp + head.skull + head.csf),
    ]
    for name, inset in shells:
        paint(tissue_ijk, ellipsoid(grid, head.centre, head.semi - inset), TISSUES[name])


def _brain_depth_mm(grid: Grid, head: Head) -> np.ndarray:
    """Approximate depth below the brain surface (mm, float32, full grid): ``(1 - r) * mean semi-axis``."""
    semi = head.brain_semi()
    radius = normalized_radius(grid, (slice(None),) * 3, head.centre, semi, np.eye(3))
    return (1.0 - radius) * np.float32(semi.mean())


def _paint_cortex(tissue_ijk: np.ndarray, grid: Grid, head: Head, rng: np.random.Generator) -> None:
    """Grey matter at the surface and along sulci (CSF-filled clefts where a folding field crosses zero)."""
    folds = smooth_field(rng, grid.shape, tuple(int(round(f / FOLD_HALF_WAVELENGTH_MM)) for f in FOV_MM), decay=0.0)
    cortex_mm = rng.uniform(2.5, 3.5)
    sulcus_depth = rng.uniform(14, 22)
    depth = _brain_depth_mm(grid, head)
    near_sulcus = np.abs(folds) / np.float32(FOLD_GRADIENT_PER_MM)  # ~ distance (mm) to the sulcal sheet f = 0
    cortex = (depth < cortex_mm) | ((depth < sulcus_depth + cortex_mm) & (near_sulcus < cortex_mm + 0.5))
    paint(tissue_ijk, full_region(grid, cortex), TISSUES["grey_matter"], replace=TISSUES.select("white_matter"))
    sulci = (depth < sulcus_depth) & (near_sulcus < 0.6)
    paint(tissue_ijk, full_region(grid, sulci), TISSUES["csf"], replace=PARENCHYMA)


def _paint_deep_structures(tissue_ijk: np.ndarray, grid: Grid, head: Head, rng: np.random.Generator) -> None:
    """Deep grey nuclei, lateral ventricles and the interhemispheric fissure."""
    brain_centre = head.centre + np.array([0.0, 0.0, 0.35 * head.brain_semi()[2]])
    for side in (-1.0, 1.0):
        nucleus = brain_centre + np.array([side * rng.uniform(18, 24), rng.uniform(-8, 4), rng.uniform(-10, 0)])
        region = ellipsoid(grid, nucleus, np.array([9.0, 15.0, 11.0]) * rng.uniform(0.8, 1.2), roughness=0.1, rng=rng)
        paint(tissue_ijk, region, TISSUES["deep_grey_matter"], replace=PARENCHYMA)
        ventricle = brain_centre + np.array([side * rng.uniform(8, 12), rng.uniform(-8, 8), rng.uniform(5, 12)])
        semi = np.array([rng.uniform(4, 8), rng.uniform(25, 35), rng.uniform(6, 10)])
        region = ellipsoid(grid, ventricle, semi, angle_rad=side * rng.uniform(0.0, 0.15), roughness=0.1, rng=rng)
        paint(tissue_ijk, region, TISSUES["csf"], replace=PARENCHYMA)
    x, _, z = grid.coords()
    fissure = (np.abs(x - np.float32(head.centre[0])) < 1.2) & (z > np.float32(brain_centre[2] + rng.uniform(10, 20)))
    paint(tissue_ijk, full_region(grid, fissure), TISSUES["csf"], replace=PARENCHYMA)


def _paint_tumour(tissue_ijk: np.ndarray, grid: Grid, head: Head, rng: np.random.Generator) -> None:
    """Necrosis inside an enhancing rim inside edema, in one hemisphere, deep enough that the core stays in the brain.

    Necrosis and rim are level sets of one perturbed distance, each grown by one voxel where needed, so
    the parts nest on any grid; edema is a rougher level set within the parenchyma plus a 3 mm shell
    around the core, kept only where connected to the core.
    """
    necrosis_mm, rim_mm, edema_mm = rng.uniform(4, 10), rng.uniform(3, 5), rng.uniform(8, 25)
    # The core ball (perturbed by at most a factor 2) must stay inside the brain: no CSF layer or skull in it.
    centre = _tumour_centre(head, rng, margin_mm=2.0 * (necrosis_mm + rim_mm + 3.0) + 3.0)
    outer = necrosis_mm + rim_mm + edema_mm
    box = grid.box(centre - 1.6 * outer, centre + 1.6 * outer)
    if box is None:
        return
    core_distance = _perturbed_distance(grid, box, centre, roughness=0.1, rng=rng)  # (n, m, l) mm
    edema_distance = _perturbed_distance(grid, box, centre, roughness=0.3, rng=rng)  # (n, m, l) mm
    necrosis = core_distance < necrosis_mm
    enhancing = (core_distance < necrosis_mm + rim_mm) | _dilate(necrosis)
    core = enhancing | necrosis
    edema = (edema_distance < outer) & np.isin(tissue_ijk[box], PARENCHYMA)
    edema |= (core_distance < necrosis_mm + rim_mm + 3.0) | _dilate(core)
    edema = _connected_to(edema, core)
    paint(tissue_ijk, Region(box, edema), TISSUES["edema"])
    paint(tissue_ijk, Region(box, enhancing), TISSUES["enhancing"])
    paint(tissue_ijk, Region(box, necrosis), TISSUES["necrosis"])


def _tumour_centre(head: Head, rng: np.random.Generator, margin_mm: float) -> np.ndarray:
    """A point in the upper brain, off the midline, at least ``margin_mm`` (+5 mm slack) inside the brain surface."""
    inner = head.brain_semi() - margin_mm - 5.0  # the ellipsoid of admissible centres
    low, high = np.array([-1.0, -1.0, 0.15]), np.array([1.0, 1.0, 0.9])
    for _ in range(100):
        offset = rng.uniform(low, high) * inner
        if np.sum(np.square(offset / inner)) < 1.0 and abs(offset[0]) > 15.0:
            return head.centre + offset
    return head.centre + np.array([0.5, 0.0, 0.5]) * inner


def _perturbed_distance(
    grid: Grid, box: Box, centre: np.ndarray, roughness: float, rng: np.random.Generator
) -> np.ndarray:
    """Distance (mm, float32, box shape) to ``centre`` divided by ``1 + roughness * f``, f smooth and unit std."""
    x, y, z = grid.coords(box)
    distance = np.sqrt(np.square(x - centre[0]) + np.square(y - centre[1]) + np.square(z - centre[2]))
    bumps = smooth_field(rng, distance.shape, (4, 4, 4), decay=1.0)
    return distance / np.maximum(1.0 + np.float32(roughness) * bumps, 0.5)


def _connected_to(mask: np.ndarray, seed_mask: np.ndarray) -> np.ndarray:
    """The parts of ``mask`` (6-connected) that touch ``seed_mask``: edema islands cut off by sulci are dropped."""
    from scipy.ndimage import label

    components, _ = label(mask)
    keep = np.unique(components[seed_mask & mask])
    return np.isin(components, keep[keep > 0])


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by one voxel (6-connectivity), so a shell is at least one voxel thick on any grid."""
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask)


def _mr_channel(tissue_ijk: np.ndarray, grid: Grid, rng: np.random.Generator, channel: str) -> np.ndarray:
    """One channel ``(I, J, K)`` int16: tissue means, blur, bias field, Rician noise."""
    image_ijk = render_channel(tissue_ijk, TISSUES.draw_means(rng, channel))
    sigma_mm = 0.4 * min(grid.spacing_mm)
    image_ijk = blur_mm(image_ijk, grid.spacing_mm, (sigma_mm,) * 3)
    image_ijk *= bias_field(rng, image_ijk.shape, rng.uniform(0.05, 0.15))
    return to_int16(rician(image_ijk, rng, rng.uniform(8, 20)), 0, 32767)


SPEC = DomainSpec(
    name="mr_brain",
    recipe_domain="mr/brain",
    modality="mr",
    channels=("flair", "t1c"),
    labels=LABELS,
    default_shape=(176, 208, 176),
    small_shape=(120, 144, 120),
    units="arbitrary",
    build=build_mr_brain,
)
