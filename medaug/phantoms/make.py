"""The phantom domains and :func:`make_phantom`, a pure function of (domain, seed, shape)."""

from __future__ import annotations

import logging
import re
import zlib

import numpy as np

from medaug.errors import ConfigError
from medaug.io.volume import Volume
from medaug.phantoms import ct_abdomen, mr_brain, mr_prostate
from medaug.phantoms.base import GENERATOR_VERSION, DomainSpec, Phantom

log = logging.getLogger(__name__)

SPECS: dict[str, DomainSpec] = {spec.name: spec for spec in (ct_abdomen.SPEC, mr_prostate.SPEC, mr_brain.SPEC)}
DOMAINS: tuple[str, ...] = tuple(SPECS)  # ("ct_abdomen", "mr_prostate", "mr_brain")
SIZES = ("default", "small")
ShapeLike = tuple[int, int, int] | str | None


def resolve_domain(name: str) -> DomainSpec:
    """The spec of a phantom domain named ``ct_abdomen`` or, as recipes name it, ``ct/abdomen``.

    Raises:
        ConfigError: unknown name; the message lists the valid ones.
    """
    for spec in SPECS.values():
        if name in (spec.name, spec.recipe_domain):
            return spec
    raise ConfigError("domain", f"unknown phantom domain {name!r}; expected one of {', '.join(DOMAINS)}")


def resolve_shape(spec: DomainSpec, shape: ShapeLike = None) -> tuple[int, int, int]:
    """The voxel matrix ``(I, J, K)``: a tuple, ``"IxJxK"``, a size name (``default``, ``small``) or None (default).

    Raises:
        ConfigError: a malformed shape or a side under 8 voxels.
    """
    if shape is None or shape == "default":
        return spec.default_shape
    if shape == "small":
        return spec.small_shape
    if isinstance(shape, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX×,]\s*(\d+)\s*[xX×,]\s*(\d+)\s*", shape)
        if match is None:
            raise ConfigError("size", f"is {shape!r}; expected one of {', '.join(SIZES)} or IxJxK such as 128x128x16")
        shape = tuple(int(value) for value in match.groups())  # type: ignore[assignment]
    values = tuple(int(value) for value in shape)  # type: ignore[union-attr]
    if len(values) != 3 or min(values) < 8:
        raise ConfigError("size", f"is {shape!r}; expected three voxel counts, each at least 8")
    return values  # type: ignore[return-value]


def subject_seed(seed: int, domain: str, index: int) -> int:
    """The seed of subject ``index`` of ``domain`` in a run seeded ``seed`` (stable across runs and platforms)."""
    sequence = np.random.SeedSequence([int(seed), zlib.crc32(domain.encode()), int(index)])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def make_phantom(domain: str, seed: int, shape: ShapeLike = None) -> Phantom:
    """Draw one phantom: a pure function of ``(domain, seed, shape)`` (numpy ``default_rng(seed)``).

    Args:
        domain: ``ct_abdomen``, ``mr_prostate``, ``mr_brain`` (or ``ct/abdomen``...).
        seed: any non-negative integer.
        shape: voxel matrix ``(I, J, K)``, ``"IxJxK"``, ``"small"`` or None (the domain's default). The
            field of view is drawn from the seed, so a smaller matrix means larger voxels, same anatomy.

    Returns:
        A :class:`Phantom`: image ``(C, I, J, K)`` int16 (HU for CT, arbitrary units for MR) and label
        ``(1, I, J, K)`` uint8 on one grid whose affine maps voxels to RAS mm with axes along +x, +y, +z.
    """
    spec = resolve_domain(domain)
    shape = resolve_shape(spec, shape)
    if seed < 0:
        raise ConfigError("seed", f"is {seed}; expected a non-negative integer")
    arrays = spec.build(np.random.default_rng(seed), shape)
    metadata = {
        "modality": spec.modality,
        "channels": list(spec.channels),
        "units": spec.units,
        "domain": spec.recipe_domain,
        "phantom_domain": spec.name,
        "phantom_seed": int(seed),
        "generator": GENERATOR_VERSION,
    }
    image = Volume(arrays.image_cijk, arrays.grid.affine, metadata)
    label = image.with_array(arrays.label_ijk[None], channels=["label"], units="label id")
    log.debug("phantom %s seed %d: shape %s spacing %s", spec.name, seed, shape, np.round(image.spacing_mm, 3))
    return Phantom(spec.name, int(seed), image, label, spec.channels, dict(spec.labels))
