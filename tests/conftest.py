"""Shared test fixtures: where the real scans are, tiny helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.pipeline import (  # noqa: F401  (session fixtures of the tiny pipeline, for every package)
    tiny_prepared,
    tiny_synthesis,
    tiny_tokenizer_run,
    tiny_var_run,
    tiny_var_task,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_real_dir() -> Path:
    """``$MEDAUG_SHARED/real`` if set, else ``../shared/real`` beside the repository."""
    base = os.environ.get("MEDAUG_SHARED")
    return Path(base) / "real" if base else REPO_ROOT.parent / "shared" / "real"


@pytest.fixture(scope="session")
def real_dir() -> Path:
    path = shared_real_dir()
    if not path.is_dir():
        pytest.skip(f"real scans not found at {path} (set MEDAUG_SHARED or put shared/ beside the repo)")
    return path
