"""MR prostate phantom: co-registered axial T2-weighted and ADC maps of the male pelvis.

Geometry (default matrix 320×320×24): in-plane field of view 150–165 mm (0.47–0.52 mm pixels, so the
``mr/prostate`` domain's 0.6 mm lands at 250–275 pixels), z extent 72–86 mm (3.0–3.6 mm slices), voxel
axes along RAS +x, +y, +z; the prostate sits near the centre.

Anatomy, each part drawn from the seed: body outline (it may exceed the small field of view, as in
real prostate MR), subcutaneous and pelvic fat, gluteal, obturator internus and rectus muscles, pubic
bones (anterior), femoral heads (lateral, superior), coccyx (posterior); the urinary bladder (wall and
urine) superior to the prostate; the prostate's transition zone (anterior, central) inside its
peripheral zone (posterior, lateral, apex); seminal vesicles (superior-posterior, unlabelled); the
rectum (wall and gas/content) posterior to the prostate, curving posteriorly as it rises.

Intensities (arbitrary units; ADC roughly in 1e-6 mm²/s): T2: urine 1200–1400, peripheral zone
620–800, transition zone 280–400, fat 480–700, muscle 100–160, bone 20–50, marrow 420–560, rectal wall
130–220, rectal gas 20–80, seminal vesicles 800–1000. ADC: urine 2600–3000, peripheral zone 1500–1900,
transition zone 1000–1300, muscle 1300–1500, fat 100–350, bladder wall 1400–1700. Then a small blur,
a multiplicative bias field on T2 (exp of a smooth field, strength 0.05–0.2), Rician noise (T2 sigma
10–25, ADC 40–90), rounding to int16 in [0, 32767].

Label ids (phantom-local, see ``recipes/datasets/phantom_mr_prostate.yaml``): 1 urinary_bladder
(wall and urine), 2 prostate_peripheral_zone, 3 prostate_transition_zone, 4 rectum (wall and lumen).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medaug.phantoms.base import DomainSpec, PhantomArrays
from medaug.phantoms.geometry import (
    Grid,
    centred_grid,
    ellipsoid,
    full_region,
    split_rng,
    tube,
)
from medaug.phantoms.imaging import bias_field, blur_mm, rician, to_int16
from medaug.phantoms.tissues import (
    Tissue,
    TissueTable,
    labels_from_tissues,
    paint,
    render_channel,
)

LABELS = {1: "urinary_bladder", 2: "prostate_peripheral_zone", 3: "prostate_transition_zone", 4: "rectum"}

TISSUES = TissueTable(
    [
        Tissue("air", 0, {"t2": (0.0, 5.0), "adc": (0.0, 20.0)}),
        Tissue("subcutaneous_fat", 0, {"t2": (550.0, 700.0), "adc": (100.0, 300.0)}),
        Tissue("pelvic_fat", 0, {"t2": (480.0, 600.0), "adc": (150.0, 350.0)}),
        Tissue("muscle", 0, {"t2": (100.0, 160.0), "adc": (1300.0, 1500.0)}),
        Tissue("cortical_bone", 0, {"t2": (20.0, 50.0), "adc": (100.0, 300.0)}),
        Tissue("marrow", 0, {"t2": (420.0, 560.0), "adc": (300.0, 500.0)}),
        Tissue("bladder_wall", 1, {"t2": (150.0, 220.0), "adc": (1400.0, 1700.0)}),
        Tissue("urine", 1, {"t2": (1200.0, 1400.0), "adc": (2600.0, 3000.0)}),
        Tissue("peripheral_zone", 2, {"t2": (620.0, 800.0), "adc": (1500.0, 1900.0)}),
        Tissue("transition_zone", 3, {"t2": (280.0, 400.0), "adc": (1000.0, 1300.0)}),
        Tissue("rectal_wall", 4, {"t2": (130.0, 220.0), "adc": (1200.0, 1500.0)}),
        Tissue("rectal_content", 4, {"t2": (20.0, 80.0), "adc": (50.0, 400.0)}),
        Tissue("seminal_vesicle", 0, {"t2": (800.0, 1000.0), "adc": (1800.0, 2200.0)}),
    ]
)

FAT = TISSUES.select("pelvic_fat")


@dataclass(frozen=True)
class Pelvis:
    """Body outline and the prostate's placement (mm, RAS world)."""

    body_centre_y: float
    body_semi: tuple[float, float]  # (lr, ap)
    fat: float  # subcutaneous fat thickness (mm)
    prostate_centre: np.ndarray  # (3,)
    prostate_semi: np.ndarray  # (3,) lr, ap, si


def build_mr_prostate(rng: np.random.Generator, shape: tuple[int, int, int]) -> PhantomArrays:
    """Draw one MR prostate phantom (channels t2, adc) on a grid of ``shape`` voxels."""
    anatomy_rng, noise_rng = split_rng(rng, 2)
    grid = _draw_grid(anatomy_rng, shape)
    pelvis = _draw_pelvis(anatomy_rng)
    tissue_ijk = np.zeros(shape, dtype=np.uint8)
    _paint_body(tissue_ijk, grid, pelvis, anatomy_rng)
    _paint_bones(tissue_ijk, grid, pelvis, anatomy_rng)
    _paint_bladder(tissue_ijk, grid, pelvis, anatomy_rng)
    _paint_prostate(tissue_ijk, grid, pelvis, anatomy_rng)
    _paint_rectum(tissue_ijk, grid, pelvis, anatomy_rng)
    t2_rng, adc_rng = split_rng(noise_rng, 2)
    t2_ijk = _mr_channel(
        tissue_ijk, grid, t2_rng, "t2", bias_strength=t2_rng.uniform(0.05, 0.2), noise=t2_rng.uniform(10, 25)
    )
    adc_ijk = _mr_channel(tissue_ijk, grid, adc_rng, "adc", bias_strength=0.0, noise=adc_rng.uniform(40, 90))
    return PhantomArrays(np.stack([t2_ijk, adc_ijk]), labels_from_tissues(tissue_ijk, TISSUES), grid)


def _draw_grid(rng: np.random.Generator, shape: tuple[int, int, int]) -> Grid:
    fov_mm = (rng.uniform(150, 165),) * 2 + (rng.uniform(72, 86),)
    return centred_grid(shape, fov_mm, rng.uniform(-5, 5, size=3))


def _draw_pelvis(rng: np.random.Generator) -> Pelvis:
    return Pelvis(
        body_centre_y=rng.uniform(5, 25),
        body_semi=(rng.uniform(165, 200), rng.uniform(105, 135)),
        fat=rng.uniform(10, 30),
        prostate_centre=np.array([rng.uniform(-3, 3), rng.uniform(-4, 4), rng.uniform(-18, -8)]),
        prostate_semi=np.array([rng.uniform(20, 28), rng.uniform(14, 20), rng.uniform(16, 24)]),
    )


def _paint_body(tissue_ijk: np.ndarray, grid: Grid, pelvis: Pelvis, rng: np.random.Generator) -> None:
    """Body outline (an elliptic cylinder), subcutaneous fat, pelvic fat, then the pelvic muscles."""
    x, y, _ = grid.coords()
    for name, inset in (("subcutaneous_fat", 0.0), ("pelvic_fat", pelvis.fat)):
        semi_lr, semi_ap = pelvis.body_semi[0] - inset, pelvis.body_semi[1] - inset
        inside = np.square(x / semi_lr) + np.square((y - pelvis.body_centre_y) / semi_ap) < 1.0  # (I, J, 1)
        paint(tissue_ijk, full_region(grid, inside), TISSUES[name])
    _paint_muscles(tissue_ijk, grid, pelvis, rng)


def _paint_muscles(tissue_ijk: np.ndarray, grid: Grid, pelvis: Pelvis, rng: np.random.Generator) -> None:
    """Gluteus maximus (posterolateral), obturator internus (lateral wall), rectus abdominis (anterior), both sides."""
    back_y = pelvis.body_centre_y - pelvis.body_semi[1] + pelvis.fat
    front_y = pelvis.body_centre_y + pelvis.body_semi[1] - pelvis.fat
    gluteus = (rng.uniform(60, 90), back_y + rng.uniform(30, 40), np.array([45.0, 30.0, 90.0]))
    obturator = (rng.uniform(50, 62), pelvis.prostate_centre[1] + rng.uniform(-10, 10), np.array([10.0, 35.0, 40.0]))
    rectus = (rng.uniform(25, 40), front_y - 8.0, np.array([30.0, 7.0, 200.0]))
    for offset_x, centre_y, semi in (gluteus, obturator, rectus):
        scaled = semi * rng.uniform(0.85, 1.15)
        for side in (-1.0, 1.0):
            centre = np.array([side * offset_x, centre_y, pelvis.prostate_centre[2]])
            region = ellipsoid(grid, centre, scaled, roughness=0.05, rng=rng)
            paint(tissue_ijk, region, TISSUES["muscle"], replace=FAT)


def _paint_bone(tissue_ijk: np.ndarray, grid: Grid, centre: np.ndarray, semi: np.ndarray, cortex_mm: float) -> None:
    """A bone: cortical shell ``cortex_mm`` thick around fatty marrow."""
    replace = FAT + TISSUES.select("muscle")
    paint(tissue_ijk, ellipsoid(grid, centre, semi), TISSUES["cortical_bone"], replace=replace)
    marrow = ellipsoid(grid, centre, semi - cortex_mm)
    paint(tissue_ijk, marrow, TISSUES["marrow"], replace=TISSUES.select("cortical_bone"))


def _paint_bones(tissue_ijk: np.ndarray, grid: Grid, pelvis: Pelvis, rng: np.random.Generator) -> None:
    """Pubic bones anterior to the prostate, femoral heads lateral and superior, coccyx posterior."""
    centre, semi = pelvis.prostate_centre, pelvis.prostate_semi
    pubis_y = centre[1] + semi[1] + rng.uniform(18, 28)
    pubis_semi = np.array([rng.uniform(14, 18), rng.uniform(9, 12), rng.uniform(25, 35)])
    femur_offset = np.array([rng.uniform(85, 100), rng.uniform(5, 20), rng.uniform(25, 40)])
    femur_radius = rng.uniform(22, 26)
    coccyx_y = centre[1] - semi[1] - rng.uniform(45, 60)
    for side in (-1.0, 1.0):
        pubis_centre = np.array([side * (pubis_semi[0] + 1.5), pubis_y, centre[2] + 5.0])
        _paint_bone(tissue_ijk, grid, pubis_centre, pubis_semi, cortex_mm=2.5)
        femur_centre = centre + femur_offset * np.array([side, 1.0, 1.0])
        _paint_bone(tissue_ijk, grid, femur_centre, np.full(3, femur_radius), cortex_mm=2.0)
    coccyx_centre = np.array([0.0, coccyx_y, centre[2] + 40.0])
    _paint_bone(
        tissue_ijk, grid, coccyx_centre, np.array([rng.uniform(12, 18), rng.uniform(7, 10), 40.0]), cortex_mm=2.0
    )


def _paint_bladder(tissue_ijk: np.ndarray, grid: Grid, pelvis: Pelvis, rng: np.random.Generator) -> None:
    """Urinary bladder (wall 3–5 mm, urine inside) above the prostate, slightly anterior."""
    semi = np.array([rng.uniform(30, 50), rng.uniform(25, 40), rng.uniform(25, 40)])
    centre = pelvis.prostate_centre + np.array(
        [rng.uniform(-4, 4), rng.uniform(5, 20), pelvis.prostate_semi[2] + rng.uniform(0.6, 0.9) * semi[2]]
    )
    wall = rng.uniform(3, 5)
    replace = FAT + TISSUES.select("muscle")
    paint(tissue_ijk, ellipsoid(grid, centre, semi, roughness=0.05, rng=rng), TISSUES["bladder_wall"], replace=replace)
    paint(tissue_ijk, ellipsoid(grid, centre, semi - wall), TISSUES["urine"], replace=TISSUES.select("bladder_wall"))
    for side in (-1.0, 1.0):  # seminal vesicles: behind the bladder base, above the prostate
        vesicle_centre = pelvis.prostate_centre + np.array(
            [side * rng.uniform(12, 20), -0.4 * pelvis.prostate_semi[1], pelvis.prostate_semi[2] + rng.uniform(0, 5)]
        )
        vesicle_semi = np.array([rng.uniform(14, 20), rng.uniform(5, 8), rng.uniform(7, 10)])
        region = ellipsoid(
            grid, vesicle_centre, vesicle_semi, angle_rad=side * rng.uniform(0.3, 0.6), roughness=0.1, rng=rng
        )
        paint(tissue_ijk, region, TISSUES["seminal_vesicle"], replace=FAT)


def _paint_prostate(tissue_ijk: np.ndarray, grid: Grid, pelvis: Pelvis, rng: np.random.Generator) -> None:
    """Peripheral zone = the gland; the transition zone (anterior, superior, central) is painted over it."""
    replace = FAT + TISSUES.select("muscle", "bladder_wall", "urine", "seminal_vesicle")
    gland = ellipsoid(grid, pelvis.prostate_centre, pelvis.prostate_semi, roughness=0.06, rng=rng)
    paint(tissue_ijk, gland, TISSUES["peripheral_zone"], replace=replace)
    tz_semi = pelvis.prostate_semi * rng.uniform(0.5, 0.7, size=3)
    tz_shift = pelvis.prostate_semi * np.array([0.0, rng.uniform(0.1, 0.25), rng.uniform(0.05, 0.2)])
    tz = ellipsoid(grid, pelvis.prostate_centre + tz_shift, tz_semi, roughness=0.08, rng=rng)
    paint(tissue_ijk, tz, TISSUES["transition_zone"], replace=TISSUES.select("peripheral_zone"))


def _paint_rectum(tissue_ijk: np.ndarray, grid: Grid, pelvis: Pelvis, rng: np.random.Generator) -> None:
    """Rectum posterior to the prostate, running up and curving back; wall 3–4 mm around gas/content."""
    semi = np.array([rng.uniform(14, 20), rng.uniform(10, 15)])
    z_p = pelvis.prostate_centre[2]
    centre_at_prostate = pelvis.prostate_centre[:2] + np.array(
        [0.0, -pelvis.prostate_semi[1] - semi[1] - rng.uniform(2, 6)]
    )
    slope_y = -rng.uniform(0.1, 0.4)  # posterior as it rises
    centre_at_zero = centre_at_prostate - np.array([0.0, slope_y * z_p])
    z_range = (grid.axis_mm(2)[0] - 1.0, grid.axis_mm(2)[-1] + 1.0)
    wall = rng.uniform(3, 4)
    replace = FAT + TISSUES.select("muscle", "seminal_vesicle")
    paint(
        tissue_ijk, tube(grid, centre_at_zero, semi, z_range, (0.0, slope_y)), TISSUES["rectal_wall"], replace=replace
    )
    lumen = tube(grid, centre_at_zero, semi - wall, z_range, (0.0, slope_y))
    paint(tissue_ijk, lumen, TISSUES["rectal_content"], replace=TISSUES.select("rectal_wall"))


def _mr_channel(
    tissue_ijk: np.ndarray, grid: Grid, rng: np.random.Generator, channel: str, bias_strength: float, noise: float
) -> np.ndarray:
    """One MR channel ``(I, J, K)`` int16: tissue means, blur, bias field (if any), Rician noise."""
    image_ijk = render_channel(tissue_ijk, TISSUES.draw_means(rng, channel))
    sigma_mm = 0.5 * grid.spacing_mm[0]
    image_ijk = blur_mm(image_ijk, grid.spacing_mm, (sigma_mm, sigma_mm, 0.0))
    if bias_strength > 0:
        image_ijk *= bias_field(rng, image_ijk.shape, bias_strength)
    return to_int16(rician(image_ijk, rng, noise), 0, 32767)


SPEC = DomainSpec(
    name="mr_prostate",
    recipe_domain="mr/prostate",
    modality="mr",
    channels=("t2", "adc"),
    labels=LABELS,
    default_shape=(320, 320, 24),
    small_shape=(192, 192, 16),
    units="arbitrary",
    build=build_mr_prostate,
)
