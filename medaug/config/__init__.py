"""Typed configs loaded from YAML recipes; unknown keys are errors (STYLE house rule 2)."""

from medaug.config.base import from_dict, read_yaml, to_dict
from medaug.config.recipes import (
    ChannelIntensity,
    DatasetRecipe,
    DomainConfig,
    PrepareRecipe,
    SourceEntry,
    load_dataset_recipe,
    load_prepare_recipe,
)

__all__ = [
    "from_dict",
    "read_yaml",
    "to_dict",
    "ChannelIntensity",
    "DatasetRecipe",
    "DomainConfig",
    "PrepareRecipe",
    "SourceEntry",
    "load_dataset_recipe",
    "load_prepare_recipe",
]
