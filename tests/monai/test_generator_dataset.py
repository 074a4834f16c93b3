"""GeneratorDataset: on-the-fly generation as MONAI items, dealt over workers and ranks without duplicates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch.utils.data import DataLoader
from monai.transforms import Compose, RandAffined, RandGaussianNoised

from medaug.errors import ConfigError
from medaug.monai import GeneratorDataset, check_generation_process
from medaug.synth.engine import SynthGenerator, export_affine
from medaug.synth.plan import PlanRequest, draw_seed, make_plan, sample_seed
from medaug.synth.run import redraw_missing

N, BATCH = 8, 2


@pytest.fixture(scope="module")
def run_dir(tiny_var_run):
    return tiny_var_run["run_dir"]


def _dataset(run_dir, **options):
    return GeneratorDataset(run_dir, structures=["liver", "prostate"], n=N, batch_size=BATCH, seed=4, **options)


def test_items_are_the_generators_samples_with_metadata(run_dir):
    items = list(_dataset(run_dir))
    assert len(items) == N and [item["slice_id"] for item in items] == [f"syn_{i:07d}" for i in range(N)]
    generator = SynthGenerator(run_dir, "cpu")
    plan = make_plan(PlanRequest(n=N, targets=("liver", "prostate"), batch_size=BATCH, seed=4), generator.bank,
                     generator.domain_names)
    expected = generator.generate(plan.batch(1), plan.request.sampling)
    _, draws = redraw_missing(generator, plan.batch(1), expected, plan.request.sampling, plan.request.redraws)
    for position, item in enumerate(items[2:4]):
        sample = plan.samples[2 + position]
        channels = len(generator.domains[sample.domain]["channels"])
        assert isinstance(item["image"], MetaTensor) and item["image"].shape == (channels, 64, 64)
        assert item["label"].shape == (1, 64, 64) and item["label"].dtype == torch.uint8
        np.testing.assert_array_equal(item["image"].numpy(), expected.image_BCHW[position, :channels])
        np.testing.assert_array_equal(item["label"][0].numpy(), expected.label_BHW[position])
        meta = item["image"].meta
        assert meta["synthetic"] and meta["seed"] == draw_seed(sample_seed(4, 2 + position), draws[position]) and meta["domain"] == sample.domain
        np.testing.assert_allclose(item["image"].affine.numpy(), export_affine(generator.domains[sample.domain], 64))
        assert list(item["structures"]) == expected.present[position]


def test_forked_workers_see_disjoint_samples_that_cover_the_plan(run_dir):
    loader = DataLoader(_dataset(run_dir), batch_size=None, num_workers=2)
    ids = [item["slice_id"] for item in loader]
    assert sorted(ids) == [f"syn_{i:07d}" for i in range(N)]


def test_ranks_and_workers_split_the_plan_exactly_once(run_dir):
    seen = []
    for rank in range(2):
        loader = DataLoader(_dataset(run_dir, rank=rank, world_size=2), batch_size=None, num_workers=2)
        seen.append({item["slice_id"] for item in loader})
    assert not seen[0] & seen[1] and sorted(seen[0] | seen[1]) == [f"syn_{i:07d}" for i in range(N)]


def test_dictionary_transforms_and_consecutive_classes(run_dir):
    transform = Compose([RandAffined(keys=["image", "label"], prob=1.0, rotate_range=0.3, mode=["bilinear", "nearest"]),
                         RandGaussianNoised(keys=["image"], prob=1.0, std=0.05)])
    dataset = _dataset(run_dir, classes=["liver", "prostate"], transform=transform)
    for item in dataset:
        values = set(torch.unique(item["label"]).tolist())
        assert values <= {0.0, 1.0, 2.0, 255.0}


def test_cuda_generation_is_refused_only_in_a_bad_fork():
    check_generation_process("cpu", in_bad_fork=True)
    check_generation_process("cuda", in_bad_fork=False)
    with pytest.raises(ConfigError, match="multiprocessing_context='spawn'"):
        check_generation_process("cuda:0", in_bad_fork=True)
