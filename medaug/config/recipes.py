"""Dataset and prepare recipes (DESIGN §3 "Recipes"), loaded from YAML into typed configs.

A *dataset recipe* describes one source dataset and version; a *prepare recipe* lists sources and holds
the one ``domains:`` table of a prepared dataset. See ``recipes/README.md`` for the YAML format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from medaug.config.base import from_dict, read_yaml
from medaug.errors import ConfigError

Layout = Literal["msd", "nnunet", "totalsegmentator", "subjects", "dicom", "images"]
Unmapped = Literal["background", "ignore", "reject"]
Plane = Literal["auto", "axial", "coronal", "sagittal"]
Modality = Literal["ct", "mr"]
Split = Literal["train", "val", "test"]

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = REPO_ROOT / "recipes"


@dataclass(frozen=True)
class ChannelIntensity:
    """How one channel maps to model space [-1, 1]: a CT window in HU or MR percentiles in a body mask."""

    window_hu: tuple[float, float] | None = None
    percentiles: tuple[float, float] | None = None

    def validate(self, where: str, modality: str) -> None:
        if (self.window_hu is None) == (self.percentiles is None):
            raise ConfigError(where, "give exactly one of window_hu (CT) or percentiles (MR)")
        if self.window_hu is not None:
            if modality != "ct":
                raise ConfigError(f"{where}.window_hu", f"is for CT; this domain's modality is {modality}")
            if not self.window_hu[0] < self.window_hu[1]:
                raise ConfigError(f"{where}.window_hu", f"is {list(self.window_hu)}; expected [low, high] with low < high")
        if self.percentiles is not None:
            low, high = self.percentiles
            if not 0.0 <= low < high <= 100.0:
                raise ConfigError(f"{where}.percentiles", f"is {[low, high]}; expected 0 <= low < high <= 100")


@dataclass(frozen=True)
class DomainConfig:
    """One domain: modality + body region, its ordered channels, geometry and intensity (DESIGN §3)."""

    modality: Modality
    channels: list[str]
    spacing_mm: float
    intensity: dict[str, ChannelIntensity]
    size: int = 256
    plane: Plane = "auto"
    min_body_fraction: float = 0.05
    name: str = ""

    def validate(self, where: str) -> None:
        if not self.channels:
            raise ConfigError(f"{where}.channels", "is empty; expected at least one channel name")
        if sorted(self.intensity) != sorted(self.channels):
            raise ConfigError(
                f"{where}.intensity",
                f"has entries for {sorted(self.intensity)}; expected one per channel {self.channels}",
            )
        for channel, mapping in self.intensity.items():
            mapping.validate(f"{where}.intensity.{channel}", self.modality)
        if self.spacing_mm <= 0:
            raise ConfigError(f"{where}.spacing_mm", f"is {self.spacing_mm}; expected a positive spacing in mm")
        if self.size < 16 or self.size % 16:
            raise ConfigError(f"{where}.size", f"is {self.size}; expected a multiple of 16, at least 16")
        if not 0.0 <= self.min_body_fraction < 1.0:
            raise ConfigError(f"{where}.min_body_fraction", f"is {self.min_body_fraction}; expected 0 <= f < 1")


@dataclass(frozen=True)
class DatasetRecipe:
    """One source dataset and version: files, channels, labels → vocabulary, grouping, default domain."""

    name: str
    layout: Layout
    channels: list[str]
    domain: DomainConfig
    dataset: str = ""
    version: str = ""
    reference: str = ""
    license: str = ""
    description: str = ""
    labels: dict[int, str] = field(default_factory=dict)
    label_files: dict[str, str] = field(default_factory=dict)
    unmapped: Unmapped = "reject"
    patient_group: str = "{subject}"
    subject_regex: str | None = None
    subject_filter: str | None = None
    splits: dict[str, Split] = field(default_factory=dict)
    frames: list[str] | None = None
    lineage: list[str] = field(default_factory=list)
    # layout-specific keys
    subjects: str = "*"
    images: dict[str, str] = field(default_factory=dict)
    label: str | None = None
    label_format: Literal["auto", "nifti", "dicom_seg", "itk"] = "auto"
    image: str = "ct.nii.gz"
    masks: str = "segmentations"
    file_ending: str = ".nii.gz"
    series_filter: str | None = None
    path: str | None = None

    @property
    def has_labels(self) -> bool:
        return self.layout != "images" and (bool(self.labels) or bool(self.label_files) or self.layout == "totalsegmentator")


@dataclass(frozen=True)
class SourceEntry:
    """One source of a prepare recipe: a folder read as a dataset recipe, feeding one domain."""

    path: str
    dataset: str
    domain: str | None = None


@dataclass(frozen=True)
class PrepareRecipe:
    """The sources of one prepared dataset and its one domain table."""

    sources: list[SourceEntry]
    domains: dict[str, DomainConfig]
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 0
    fingerprint_merge: bool = True


def load_dataset_recipe(path: str | Path) -> DatasetRecipe:
    """Load and validate a dataset recipe; errors name the file and the key."""
    path = resolve_recipe_path(path)
    data = read_yaml(path)
    recipe = from_dict(DatasetRecipe, data, where=str(path))
    domain = recipe.domain if recipe.domain.name else replace(recipe.domain, name=recipe.name)
    recipe = replace(recipe, domain=domain)
    validate_dataset_recipe(recipe, str(path))
    return recipe


def validate_dataset_recipe(recipe: DatasetRecipe, where: str) -> None:
    from medaug import vocab

    recipe.domain.validate(f"{where}:domain")
    if not re.fullmatch(r"[a-z0-9_]+", recipe.name):
        raise ConfigError(f"{where}:name", f"is {recipe.name!r}; expected snake_case letters, digits, underscores")
    if recipe.domain.channels != recipe.channels:
        raise ConfigError(f"{where}:domain.channels", f"is {recipe.domain.channels}; expected the recipe's channels {recipe.channels}")
    for source_id, name in recipe.labels.items():
        if source_id < 1:
            raise ConfigError(f"{where}:labels.{source_id}", "label ids start at 1 (0 is background)")
        if name not in ("ignore", "background"):
            _require_vocabulary_name(vocab, name, f"{where}:labels.{source_id}")
    for stem, name in recipe.label_files.items():
        _require_vocabulary_name(vocab, name, f"{where}:label_files.{stem}")
    if recipe.layout == "subjects" and not recipe.images:
        raise ConfigError(f"{where}:images", "layout 'subjects' needs images: {channel: glob}")
    if recipe.layout == "subjects" and sorted(recipe.images) != sorted(recipe.channels):
        raise ConfigError(f"{where}:images", f"has {sorted(recipe.images)}; expected one glob per channel {recipe.channels}")
    try:
        recipe.patient_group.format(subject="s", dataset="d", **_regex_groups(recipe))
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"{where}:patient_group", f"uses an unknown field {error}; allowed: subject, dataset and subject_regex groups") from None


def _regex_groups(recipe: DatasetRecipe) -> dict[str, str]:
    if not recipe.subject_regex:
        return {}
    try:
        return {name: "x" for name in re.compile(recipe.subject_regex).groupindex}
    except re.error as error:
        raise ConfigError("subject_regex", f"is not a valid regular expression ({error})") from None


def _require_vocabulary_name(vocab, name: str, where: str) -> None:
    if name not in vocab.VOCABULARY:
        import difflib

        close = difflib.get_close_matches(name, list(vocab.VOCABULARY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(where, f"{name!r} is not in the vocabulary (medaug/vocab.py){hint}")


def load_prepare_recipe(path: str | Path) -> PrepareRecipe:
    """Load a prepare recipe; relative source paths resolve against the recipe's folder."""
    path = resolve_recipe_path(path)
    recipe = from_dict(PrepareRecipe, read_yaml(path), where=str(path))
    if not recipe.sources:
        raise ConfigError(f"{path}:sources", "is empty; expected at least one {path, dataset} entry")
    domains = {name: replace(domain, name=name) for name, domain in recipe.domains.items()}
    for name, domain in domains.items():
        domain.validate(f"{path}:domains.{name}")
    return replace(recipe, domains=domains)


def is_prepare_recipe(path: str | Path) -> bool:
    return "sources" in read_yaml(resolve_recipe_path(path))


def resolve_recipe_path(path: str | Path) -> Path:
    """A recipe path as given, else relative to the repository's ``recipes/`` (``datasets/brats2013``)."""
    path = Path(path)
    candidates = [path, RECIPES_DIR / path, RECIPES_DIR / f"{path}.yaml", RECIPES_DIR / "datasets" / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(path, f"recipe not found (also looked in {RECIPES_DIR})")
