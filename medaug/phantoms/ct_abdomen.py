"""CT abdomen phantom: an axial upper-abdomen CT in HU with an opacified aorta and unenhanced organs.

Geometry (default matrix 512×512×40): in-plane field of view 380–480 mm (0.74–0.94 mm pixels), z extent
150–200 mm (3.75–5 mm slices), voxel axes along RAS +x, +y, +z; world z = 0 is about the L1 level.

Anatomy, each part drawn from the seed: a body outline (ellipse with a flattened back whose size varies
along z), subcutaneous fat, the abdominal muscle wall, visceral fat with bowel loops and gas, the
lumbar spine (vertebral bodies with cortex and cancellous bone, discs, posterior elements, spinal canal),
paraspinal and psoas muscles, liver (right lobe on the patient's right plus a left lobe across the
midline), spleen (posterior left), kidneys (posterior, either side of the spine, the right one lower),
the aorta (anterior-left of the spine) and the inferior vena cava (anterior-right, labelled ``body``).

Tissue means (HU; each subject draws its value from the central 40% of the range): air -1010…-990,
fat -120…-80, skeletal muscle 40…60, liver 50…70, spleen 40…55, kidneys 30…40 (unenhanced), aorta
150…250 (arterial contrast), IVC 80…130, bowel 10…40, bowel gas -980…-850, cancellous bone 300…450,
cortical bone 700…1000, disc 70…110, spinal canal 0…30. Then: a smooth additive variation (std 0.5–1.5 HU),
an in-plane blur (sigma 0.4–0.7 mm), Gaussian noise (sigma 10–20 HU), rounding to int16 in [-1024, 3071].

Label ids (phantom-local, see ``recipes/datasets/phantom_ct_abdomen.yaml``): 1 body (tissue inside the
body outline not covered by another label: visceral fat, bowel, vessels other than the aorta, discs,
spinal canal), 2 subcutaneous_fat, 3 skeletal_muscle, 4 liver, 5 spleen, 6 kidney_left, 7 kidney_right,
8 aorta, 9 vertebrae. So ``label > 0`` is the body outline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medaug.phantoms.base import DomainSpec, PhantomArrays
from medaug.phantoms.geometry import (
    Grid,
    Region,
    centred_grid,
    ellipsoid,
    full_region,
    split_rng,
    tube,
)
from medaug.phantoms.imaging import (
    add_gaussian_noise,
    add_smooth_variation,
    blur_mm,
    to_int16,
)
from medaug.phantoms.tissues import (
    Tissue,
    TissueTable,
    labels_from_tissues,
    paint,
    render_channel,
)

LABELS = {
    1: "body",
    2: "subcutaneous_fat",
    3: "skeletal_muscle",
    4: "liver",
    5: "spleen",
    6: "kidney_left",
    7: "kidney_right",
    8: "aorta",
    9: "vertebrae",
}

TISSUES = TissueTable(
    [
        Tissue("air", 0, {"ct": (-1010.0, -990.0)}),
        Tissue("subcutaneous_fat", 2, {"ct": (-120.0, -80.0)}),
        Tissue("skeletal_muscle", 3, {"ct": (40.0, 60.0)}),
        Tissue("visceral_fat", 1, {"ct": (-120.0, -80.0)}),
        Tissue("bowel", 1, {"ct": (10.0, 40.0)}),
        Tissue("bowel_gas", 1, {"ct": (-980.0, -850.0)}),
        Tissue("liver", 4, {"ct": (50.0, 70.0)}),
        Tissue("spleen", 5, {"ct": (40.0, 55.0)}),
        Tissue("kidney_left", 6, {"ct": (30.0, 40.0)}),
        Tissue("kidney_right", 7, {"ct": (30.0, 40.0)}),
        Tissue("aorta", 8, {"ct": (150.0, 250.0)}),
        Tissue("ivc", 1, {"ct": (80.0, 130.0)}),
        Tissue("cortical_bone", 9, {"ct": (700.0, 1000.0)}),
        Tissue("cancellous_bone", 9, {"ct": (300.0, 450.0)}),
        Tissue("disc", 1, {"ct": (70.0, 110.0)}),
        Tissue("spinal_canal", 1, {"ct": (0.0, 30.0)}),
    ]
)

CAVITY = TISSUES.select("visceral_fat", "bowel", "bowel_gas")


@dataclass(frozen=True)
class Trunk:
    """The body outline and its layers (mm): semi-axes at z = 0 and how they vary along z."""

    semi_lr: float  # body half-width (x) at z = 0
    semi_ap: float  # body half-depth (y, anterior) at z = 0
    back_fraction: float  # the back is the plane y = -back_fraction * semi_ap(z)
    wave_mm: float  # wavelength of the size variation along z
    wave_phase: float
    fat_lateral: float  # subcutaneous fat thickness at the sides
    fat_anterior: float
    fat_posterior: float
    muscle: float  # abdominal wall muscle thickness

    def semi_axes(self, z_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Body semi-axes (lr, ap) in mm at heights ``z_mm``."""
        wave = np.sin(2 * np.pi * z_mm / self.wave_mm + self.wave_phase)
        return self.semi_lr * (1.0 + 0.04 * wave), self.semi_ap * (1.0 + 0.06 * wave)


@dataclass(frozen=True)
class Spine:
    """Lumbar spine placement (mm): vertebral body centre y, radius, and the disc pattern along z."""

    centre_y: float
    radius: float
    period: float  # vertebra + disc height
    disc: float  # disc height
    phase: float  # z offset of the disc pattern


def build_ct_abdomen(rng: np.random.Generator, shape: tuple[int, int, int]) -> PhantomArrays:
    """Draw one CT abdomen phantom on a grid of ``shape`` voxels (see the module docstring)."""
    anatomy_rng, noise_rng = split_rng(rng, 2)
    grid = _draw_grid(anatomy_rng, shape)
    trunk = _draw_trunk(anatomy_rng)
    tissue_ijk = np.zeros(shape, dtype=np.uint8)
    _paint_trunk(tissue_ijk, grid, trunk)
    spine = _paint_spine(tissue_ijk, grid, trunk, anatomy_rng)
    _paint_bowel(tissue_ijk, grid, trunk, anatomy_rng)
    _paint_liver_and_spleen(tissue_ijk, grid, trunk, anatomy_rng)
    _paint_kidneys(tissue_ijk, grid, spine, anatomy_rng)
    _paint_vessels(tissue_ijk, grid, spine, anatomy_rng)
    image_ijk = _ct_image(tissue_ijk, grid, noise_rng)
    return PhantomArrays(image_ijk[None], labels_from_tissues(tissue_ijk, TISSUES), grid)


def _draw_grid(rng: np.random.Generator, shape: tuple[int, int, int]) -> Grid:
    fov_mm = (rng.uniform(380, 480),) * 2 + (rng.uniform(150, 200),)
    centre_mm = np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-20, 20)])
    return centred_grid(shape, fov_mm, centre_mm)


def _draw_trunk(rng: np.random.Generator) -> Trunk:
    fat_lateral = rng.uniform(8, 30)
    return Trunk(
        semi_lr=rng.uniform(135, 175),
        semi_ap=rng.uniform(95, 125),
        back_fraction=rng.uniform(0.85, 0.95),
        wave_mm=rng.uniform(250, 400),
        wave_phase=rng.uniform(0, 2 * np.pi),
        fat_lateral=fat_lateral,
        fat_anterior=fat_lateral * rng.uniform(0.8, 1.5),
        fat_posterior=fat_lateral * rng.uniform(0.5, 1.0),
        muscle=rng.uniform(8, 15),
    )


def _inside_trunk(grid: Grid, trunk: Trunk, inset_lr: float, inset_ap: float, inset_back: float) -> np.ndarray:
    """Full-grid mask of the body outline shrunk by the given insets (mm) at the sides, front and back."""
    x, y, z = grid.coords()
    semi_lr, semi_ap = trunk.semi_axes(z)  # (1, 1, K) each
    lateral = np.square(x / (semi_lr - inset_lr))  # (I, 1, K)
    frontal = np.square(y / (semi_ap - inset_ap))  # (1, J, K)
    above_back = y > -trunk.back_fraction * semi_ap + inset_back  # (1, J, K)
    return (lateral + frontal < 1.0) & above_back


def _paint_trunk(tissue_ijk: np.ndarray, grid: Grid, trunk: Trunk) -> None:
    """Concentric layers: subcutaneous fat under the skin, the muscle wall (thicker at the back), visceral fat."""
    wall = trunk.muscle
    layers = [
        ("subcutaneous_fat", 0.0, 0.0, 0.0),
        ("skeletal_muscle", trunk.fat_lateral, trunk.fat_anterior, trunk.fat_posterior),
        ("visceral_fat", trunk.fat_lateral + wall, trunk.fat_anterior + wall, trunk.fat_posterior + 2.5 * wall),
    ]
    for name, inset_lr, inset_ap, inset_back in layers:
        mask = _inside_trunk(grid, trunk, inset_lr, inset_ap, inset_back)
        paint(tissue_ijk, full_region(grid, mask), TISSUES[name])


def _draw_spine(trunk: Trunk, rng: np.random.Generator) -> Spine:
    """Vertebral body centre 62–78 mm in front of the back's fat, radius 16–21 mm, a disc every 28–34 mm."""
    back_y = -trunk.back_fraction * trunk.semi_ap
    return Spine(
        centre_y=back_y + trunk.fat_posterior + rng.uniform(62, 78),
        radius=rng.uniform(16, 21),
        period=rng.uniform(28, 34),
        disc=rng.uniform(6, 9),
        phase=rng.uniform(0, 34),
    )


def _paint_spine(tissue_ijk: np.ndarray, grid: Grid, trunk: Trunk, rng: np.random.Generator) -> Spine:
    """Vertebral bodies (cortex, cancellous bone, discs), posterior elements, canal, paraspinal and psoas muscles."""
    spine = _draw_spine(trunk, rng)
    z_range = (grid.axis_mm(2)[0] - 1.0, grid.axis_mm(2)[-1] + 1.0)
    disc_k = np.mod(grid.axis_mm(2) - spine.phase, spine.period) < spine.disc  # (K,)
    bone, soft = TISSUES.select("cortical_bone", "cancellous_bone"), TISSUES.select("visceral_fat", "skeletal_muscle")
    body_xy, body_semi = np.array([0.0, spine.centre_y]), np.array([1.1, 1.0]) * spine.radius
    vertebra = tube(grid, body_xy, body_semi, z_range)
    paint(tissue_ijk, vertebra, TISSUES["cortical_bone"], replace=soft)
    paint(tissue_ijk, tube(grid, body_xy, body_semi - 2.5, z_range), TISSUES["cancellous_bone"], replace=bone)
    paint(tissue_ijk, _restrict_k(vertebra, disc_k), TISSUES["disc"], replace=bone)
    posterior_y = spine.centre_y - spine.radius
    spinous = tube(grid, np.array([0.0, posterior_y - 22.0]), np.array([7.0, 22.0]), z_range)
    transverse = tube(grid, np.array([0.0, posterior_y - 8.0]), np.array([38.0, 6.0]), z_range)
    for process in (spinous, transverse):  # at vertebral levels only, not at the discs
        paint(tissue_ijk, _restrict_k(process, ~disc_k), TISSUES["cortical_bone"], replace=soft)
    canal = tube(grid, np.array([0.0, posterior_y - 9.0]), np.array([9.0, 8.0]), z_range)
    paint(tissue_ijk, canal, TISSUES["spinal_canal"], replace=bone + soft)
    _paint_spine_muscles(tissue_ijk, grid, spine, rng)
    return spine


def _restrict_k(region: Region | None, keep_k: np.ndarray) -> Region | None:
    """The region limited to the slices where ``keep_k`` (over the whole grid's k axis) is True."""
    if region is None:
        return None
    return Region(region.box, region.mask & keep_k[region.box[2]][None, None, :])


def _paint_spine_muscles(tissue_ijk: np.ndarray, grid: Grid, spine: Spine, rng: np.random.Generator) -> None:
    """Erector spinae behind the transverse processes and the psoas muscles that thicken caudally."""
    muscle, fat = TISSUES["skeletal_muscle"], TISSUES.select("visceral_fat")
    paraspinal_y = spine.centre_y - spine.radius - rng.uniform(28, 34)
    psoas_x = 1.1 * spine.radius + rng.uniform(10, 16)
    psoas_semi = np.array([rng.uniform(16, 22), rng.uniform(14, 19), 180.0])
    for side in (-1.0, 1.0):
        paraspinal = ellipsoid(grid, np.array([side * 24.0, paraspinal_y, 0.0]), np.array([21.0, 17.0, 400.0]))
        paint(tissue_ijk, paraspinal, muscle, replace=fat)
        psoas = ellipsoid(grid, np.array([side * psoas_x, spine.centre_y - 2.0, -120.0]), psoas_semi)
        paint(tissue_ijk, psoas, muscle, replace=fat)


def _paint_bowel(tissue_ijk: np.ndarray, grid: Grid, trunk: Trunk, rng: np.random.Generator) -> None:
    """Bowel loops in the anterior abdomen, some holding gas on their anterior (non-dependent) side."""
    z_low, z_high = grid.axis_mm(2)[0], grid.axis_mm(2)[-1]
    for _ in range(12):
        centre = np.array(
            [rng.uniform(-0.7, 0.7) * trunk.semi_lr, rng.uniform(-0.1, 0.8) * trunk.semi_ap, rng.uniform(z_low, z_high)]
        )
        radius = rng.uniform(12, 28)
        semi = radius * rng.uniform(0.7, 1.3, size=3)
        paint(tissue_ijk, ellipsoid(grid, centre, semi, roughness=0.15, rng=rng), TISSUES["bowel"], replace=CAVITY)
        gas_radius = rng.uniform(3, 0.5 * radius)
        if rng.uniform() < 0.5:
            gas = ellipsoid(grid, centre + np.array([0.0, 0.5 * radius, 0.0]), np.full(3, gas_radius))
            paint(tissue_ijk, gas, TISSUES["bowel_gas"], replace=TISSUES.select("bowel"))


def _paint_liver_and_spleen(tissue_ijk: np.ndarray, grid: Grid, trunk: Trunk, rng: np.random.Generator) -> None:
    """Liver on the patient's right (+x) with a left lobe reaching across the midline; spleen on the left (-x)."""
    cavity_lr = trunk.semi_lr - trunk.fat_lateral - trunk.muscle
    cavity_ap = trunk.semi_ap - trunk.fat_anterior - trunk.muscle
    right_lobe = np.array([rng.uniform(0.35, 0.5) * cavity_lr, rng.uniform(-0.1, 0.2) * cavity_ap, rng.uniform(30, 60)])
    right_lobe_semi = np.array([rng.uniform(60, 85), rng.uniform(60, 85), rng.uniform(70, 100)])
    _paint_organ(tissue_ijk, grid, rng, "liver", right_lobe, right_lobe_semi, rng.uniform(-0.3, 0.3))
    left_lobe = np.array(
        [rng.uniform(-0.15, 0.05) * cavity_lr, rng.uniform(0.35, 0.55) * cavity_ap, right_lobe[2] + rng.uniform(5, 25)]
    )
    left_lobe_semi = np.array([rng.uniform(45, 65), rng.uniform(20, 32), rng.uniform(40, 60)])
    _paint_organ(tissue_ijk, grid, rng, "liver", left_lobe, left_lobe_semi, rng.uniform(-0.3, 0.3))
    spleen = np.array([-rng.uniform(0.55, 0.7) * cavity_lr, -rng.uniform(0.1, 0.35) * cavity_ap, rng.uniform(20, 50)])
    spleen_semi = np.array([rng.uniform(22, 32), rng.uniform(45, 60), rng.uniform(45, 65)])
    _paint_organ(tissue_ijk, grid, rng, "spleen", spleen, spleen_semi, rng.uniform(0.3, 0.7))


def _paint_organ(
    tissue_ijk: np.ndarray,
    grid: Grid,
    rng: np.random.Generator,
    name: str,
    centre: np.ndarray,
    semi: np.ndarray,
    angle_rad: float,
    roughness: float = 0.1,
    replace: tuple[int, ...] = CAVITY,
) -> None:
    """A lumpy ellipsoidal organ (mm, RAS), painted only over ``replace`` tissues."""
    region = ellipsoid(grid, centre, semi, angle_rad=angle_rad, roughness=roughness, rng=rng)
    paint(tissue_ijk, region, TISSUES[name], replace=replace)


def _paint_kidneys(tissue_ijk: np.ndarray, grid: Grid, spine: Spine, rng: np.random.Generator) -> None:
    """Kidneys beside the spine, the right one lower; the hilum (renal sinus fat) faces anteromedially."""
    z_left = rng.uniform(-20, 10)
    heights = {"kidney_left": z_left, "kidney_right": z_left - rng.uniform(5, 25)}
    replace = CAVITY + TISSUES.select("liver", "spleen")
    for name, side in (("kidney_left", -1.0), ("kidney_right", 1.0)):
        centre = np.array([side * rng.uniform(62, 78), spine.centre_y + rng.uniform(0, 15), heights[name]])
        semi = np.array([rng.uniform(22, 28), rng.uniform(25, 32), rng.uniform(45, 58)])
        angle = -side * rng.uniform(0.3, 0.6)  # long in-plane axis turned so the hilum looks anteromedially
        _paint_organ(tissue_ijk, grid, rng, name, centre, semi, angle, roughness=0.06, replace=replace)
        hilum = centre + np.array([-side * 0.7 * semi[0], 0.3 * semi[1], 0.0])
        sinus = ellipsoid(grid, hilum, semi * np.array([0.45, 0.35, 0.45]))
        paint(tissue_ijk, sinus, TISSUES["visceral_fat"], replace=TISSUES.select(name))


def _paint_vessels(tissue_ijk: np.ndarray, grid: Grid, spine: Spine, rng: np.random.Generator) -> None:
    """Aorta anterior-left of the vertebral body (x < 0), inferior vena cava anterior-right (x > 0)."""
    z_range = (grid.axis_mm(2)[0] - 1.0, grid.axis_mm(2)[-1] + 1.0)
    replace = CAVITY + TISSUES.select("liver", "spleen")
    aorta_radius = rng.uniform(9, 13)
    aorta_xy = np.array([-rng.uniform(8, 20), spine.centre_y + spine.radius + aorta_radius + rng.uniform(1, 5)])
    slope = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05))
    paint(tissue_ijk, tube(grid, aorta_xy, np.full(2, aorta_radius), z_range, slope), TISSUES["aorta"], replace=replace)
    ivc_xy = np.array([rng.uniform(18, 28), spine.centre_y + spine.radius + rng.uniform(8, 16)])
    ivc_semi = np.array([rng.uniform(10, 14), rng.uniform(7, 10)])
    paint(tissue_ijk, tube(grid, ivc_xy, ivc_semi, z_range, slope), TISSUES["ivc"], replace=replace)


def _ct_image(tissue_ijk: np.ndarray, grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """HU image ``(I, J, K)`` int16: tissue means, smooth variation, in-plane blur, quantum noise."""
    means = TISSUES.draw_means(rng, "ct", margin=0.3)
    image_ijk = render_channel(tissue_ijk, means)
    image_ijk = add_smooth_variation(image_ijk, rng, rng.uniform(0.5, 1.5))
    sigma_mm = rng.uniform(0.4, 0.7)
    image_ijk = blur_mm(image_ijk, grid.spacing_mm, (sigma_mm, sigma_mm, 0.0))
    image_ijk = add_gaussian_noise(image_ijk, rng, rng.uniform(10, 20))
    return to_int16(image_ijk, -1024, 3071)


SPEC = DomainSpec(
    name="ct_abdomen",
    recipe_domain="ct/abdomen",
    modality="ct",
    channels=("ct",),
    labels=LABELS,
    default_shape=(512, 512, 40),
    small_shape=(256, 256, 24),
    units="HU",
    build=build_ct_abdomen,
)
