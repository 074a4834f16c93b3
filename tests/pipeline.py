"""The tiny phantom pipeline, trained once per test session and shared by every test package.

A small prepared dataset of all three phantom domains at 64², the tiny tokenizer trained on it, the tiny
MedVAR transformer trained on that, and a synthesis run of it. The fixtures are session-scoped and made
visible to every package by ``tests/conftest.py``; tests that need a checkpoint or samples reuse them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# phantom voxel matrix and the domain spacing (mm) that fits its body into 64 pixels
PHANTOM_DOMAINS: dict[str, tuple[tuple[int, int, int], float]] = {
    "ct_abdomen": ((56, 56, 10), 8.0),     # 380-480 mm field of view
    "mr_brain": ((48, 56, 14), 3.5),       # 176 x 208 mm head
    "mr_prostate": ((64, 64, 10), 2.5),    # 150-165 mm pelvis
}
# 80 steps leave the prostate T2 below a constant-image baseline; 150 (about 25 s on 2 cores) clear it
TINY_STEPS = 150
TINY_OVERRIDES = [f"train.max_steps={TINY_STEPS}", "train.optim.vqvae.warmup_steps=5", "train.log_every=10",
                  "eval.grid_rows=6"]


def write_tiny_prepared(root: Path, domains: list[str] | None = None, n: int = 3, seed: int = 1) -> Path:
    """Phantoms of ``domains`` (``n`` subjects each) prepared at 64² into ``root/prepared``.

    Each domain's dataset recipe is copied with a coarse spacing, size 64, and subject ``phantom_0002``
    (or the last one) pinned to ``val``, so the val split is never empty. Returns the prepared folder.
    """
    from medaug.config.recipes import load_prepare_recipe
    from medaug.phantoms import write_phantoms
    from medaug.prepare.pipeline import run_prepare

    sources, domain_table = [], {}
    for name in domains or list(PHANTOM_DOMAINS):
        shape, spacing_mm = PHANTOM_DOMAINS[name]
        write_phantoms(root / "phantoms", domains=[name], n=n, seed=seed, shape=shape)
        recipe = yaml.safe_load((REPO / f"recipes/datasets/phantom_{name}.yaml").read_text())
        recipe["domain"].update(spacing_mm=spacing_mm, size=64)
        recipe["splits"] = {f"phantom_{n - 1:04d}": "val"}
        recipe_path = root / f"phantom_{name}_64.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe))
        sources.append({"path": str(root / "phantoms" / name), "dataset": str(recipe_path)})
        domain = dict(recipe["domain"])
        domain_table[domain.pop("name")] = domain
    prepare_path = root / "prepare.yaml"
    prepare_path.write_text(yaml.safe_dump({"sources": sources, "domains": domain_table}))
    out = root / "prepared"
    summary = run_prepare(load_prepare_recipe(prepare_path), out)
    assert summary.volumes_rejected == 0, summary.rejected
    return out


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """Three phantoms per domain (CT abdomen, MR brain, MR prostate) at 64²; one subject each in val."""
    return write_tiny_prepared(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny_tokenizer_run(tiny_prepared, tmp_path_factory) -> dict[str, Any]:
    """``recipes/models/tiny.yaml`` trained for ``TINY_STEPS`` steps on :func:`tiny_prepared`, evaluated.

    Returns :func:`medaug.train.tokenizer.train_tokenizer`'s summary (run_dir, checkpoint, evaluation...).
    """
    from medaug.train.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    return train_tokenizer(tiny_prepared, REPO / "recipes/models/tiny.yaml", out, overrides=TINY_OVERRIDES)


# ---------------------------------------------------------------- the MedVAR transformer on the tiny tokenizer

MEDVAR_TINY = REPO / "recipes/models/medvar-tiny.yaml"
VAR_RUN_STEPS = 30
VAR_RUN_OVERRIDES = [f"train.max_steps={VAR_RUN_STEPS}", "train.log_every=5", "train.checkpoint_every=100",
                     "samples.per_domain=2", "train.device=cpu"]


@pytest.fixture(scope="session")
def tiny_var_task(tiny_prepared, tiny_tokenizer_run, tmp_path_factory):
    """``medvar-tiny`` as a :class:`~medaug.train.var_task.VarTask` on :func:`tiny_tokenizer_run`: the tokenizer
    copied into a run folder and the train split tokenized into its token cache (no training)."""
    import torch

    from medaug.train.var_task import build_var_task, load_var_recipe

    run = tmp_path_factory.mktemp("var-task") / "run"
    recipe = load_var_recipe(MEDVAR_TINY, ["train.device=cpu"])
    return build_var_task(tiny_prepared, tiny_tokenizer_run["run_dir"], recipe, run, torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_var_run(tiny_prepared, tiny_tokenizer_run, tmp_path_factory) -> dict[str, Any]:
    """``medvar-tiny`` trained for ``VAR_RUN_STEPS`` steps by :func:`medaug.train.var_task.train_var` (its summary)."""
    from medaug.train.var_task import train_var

    out = tmp_path_factory.mktemp("var-run") / "run"
    return train_var(tiny_prepared, tiny_tokenizer_run["run_dir"], MEDVAR_TINY, out, overrides=VAR_RUN_OVERRIDES)


# ---------------------------------------------------------------- synthesis with the tiny generator

SYNTH_N = 24
SYNTH_BATCH = 8


@pytest.fixture(scope="session")
def tiny_synthesis(tiny_var_run, tmp_path_factory) -> dict[str, Any]:
    """``medaug synthesize`` of :func:`tiny_var_run`: ``SYNTH_N`` samples balanced over ``liver`` and
    ``prostate`` in batches of ``SYNTH_BATCH``, exported as PNG, NIfTI and nnU-Net. Returns
    ``{"out", "run", "request", "export", "summary"}``."""
    from medaug.synth.plan import PlanRequest
    from medaug.synth.run import ExportSettings, synthesize

    out = tmp_path_factory.mktemp("synthesis") / "out"
    request = PlanRequest(n=SYNTH_N, targets=("liver", "prostate"), batch_size=SYNTH_BATCH, seed=3)
    export = ExportSettings(formats=("png", "nifti", "nnunet"), montage=8)
    result = synthesize(tiny_var_run["run_dir"], out, request, export, device="cpu")
    return {"out": out, "run": tiny_var_run["run_dir"], "request": request, "export": export,
            "summary": result.summary}
