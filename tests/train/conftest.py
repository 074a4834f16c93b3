"""The training tests use the session-wide tiny pipeline of ``tests/pipeline.py`` (fixtures registered in
``tests/conftest.py``); its constants are re-exported here for the modules that import them."""

from tests.pipeline import MEDVAR_TINY, REPO, TINY_OVERRIDES, TINY_STEPS, VAR_RUN_STEPS, write_tiny_prepared

__all__ = ["MEDVAR_TINY", "REPO", "TINY_OVERRIDES", "TINY_STEPS", "VAR_RUN_STEPS", "write_tiny_prepared"]
