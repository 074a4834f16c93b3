"""PreparedSliceDataset: items against the arrays written, filters, DataLoader with 2 workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medaug.data.dataset import PreparedSliceDataset, batched_loader
from medaug.errors import ConfigError
from tests.data.conftest import MIXED_SPECS


def expected_item(mixed, slice_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(image (2, H, W) float32 zero-filled, label (H, W), channel mask (2,), domain), from the test's arrays."""
    volume_id, slice_index = slice_id.split(":")
    row = int(slice_index) - 10
    source = mixed.images[volume_id][row].astype(np.float16).astype(np.float32)
    image = np.zeros((2, *source.shape[1:]), dtype=np.float32)
    image[: source.shape[0]] = source
    labels = mixed.labels[volume_id]
    label = labels[row] if labels is not None else np.full(source.shape[1:], 255, np.uint8)
    mask = np.arange(2) < source.shape[0]
    domain = mixed.rows[volume_id][row]["domain"]
    return image, label, mask, domain


def assert_item_matches(mixed, item: dict) -> None:
    image, label, mask, domain = expected_item(mixed, item["slice_id"])
    np.testing.assert_array_equal(item["image"].float().numpy(), image)
    np.testing.assert_array_equal(item["label"].numpy(), label)
    np.testing.assert_array_equal(item["channel_mask"].numpy(), mask)
    assert item["domain"] == domain


def test_items_equal_the_written_arrays(mixed):
    dataset = PreparedSliceDataset(mixed.root)
    assert len(dataset) == 18 and dataset.channels_out == 2
    for position in range(len(dataset)):
        item = dataset[position]
        assert item["index"] == position
        assert item["image"].shape == (2, 16, 16) and item["image"].dtype == torch.float32
        assert item["label"].dtype == torch.uint8
        assert_item_matches(mixed, item)


def test_batch_read_equals_item_reads(mixed):
    dataset = PreparedSliceDataset(mixed.root, dtype=torch.float16)
    picks = [17, 0, 9, 3, 3, 12]
    batch = dataset[picks]
    assert batch["image"].shape == (6, 2, 16, 16) and batch["image"].dtype == torch.float16
    assert batch["index"].tolist() == picks
    for b, position in enumerate(picks):
        single = dataset[position]
        assert torch.equal(batch["image"][b], single["image"])
        assert torch.equal(batch["label"][b], single["label"])
        assert batch["slice_id"][b] == single["slice_id"]


@pytest.mark.parametrize(
    ("options", "expected_volumes"),
    [
        ({"split": "train"}, {"a000000000000001", "d000000000000004"}),
        ({"split": ["val", "test"]}, {"b000000000000002", "c000000000000003"}),
        ({"domains": "mr/prostate"}, {"b000000000000002", "d000000000000004"}),
        ({"domains": ["mr/prostate"], "split": "train"}, {"d000000000000004"}),
    ],
    ids=["train", "val+test", "domain", "domain+split"],
)
def test_split_and_domain_filters(mixed, options, expected_volumes):
    dataset = PreparedSliceDataset(mixed.root, **options)
    volumes = {slice_id.split(":")[0] for slice_id in dataset.rows.column("slice_id").to_pylist()}
    assert volumes == expected_volumes
    assert len(dataset) == sum(s["slices"] for s in MIXED_SPECS if s["volume_id"] in expected_volumes)
    assert dataset.channels_out == 2  # C_max comes from the whole index, not the filtered rows


def test_structure_filter_keeps_rows_with_any_of_them(mixed):
    dataset = PreparedSliceDataset(mixed.root, structures=["bladder", "spleen"])
    # b...2 has bladder in slices 2 and 3; nothing has spleen present.
    assert dataset.rows.column("slice_id").to_pylist() == ["b000000000000002:0012", "b000000000000002:0013"]


def test_channels_out_pads_and_refuses_too_few(mixed):
    dataset = PreparedSliceDataset(mixed.root, channels_out=4, domains="ct/abdomen")
    item = dataset[0]
    assert item["image"].shape == (4, 16, 16)
    assert item["channel_mask"].tolist() == [True, False, False, False]
    assert torch.count_nonzero(item["image"][1:]) == 0
    with pytest.raises(ConfigError, match="channels_out"):
        PreparedSliceDataset(mixed.root, channels_out=1)


def test_out_of_range_index_raises(mixed):
    dataset = PreparedSliceDataset(mixed.root, split="val")
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_default_dataloader_with_two_workers(mixed):
    dataset = PreparedSliceDataset(mixed.root)
    loader = DataLoader(dataset, batch_size=4, shuffle=False, num_workers=2)
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (2, 16, 16)
        for b in range(len(batch["index"])):
            item = {key: value[b] for key, value in batch.items()}
            assert_item_matches(mixed, item)
            seen.append(int(batch["index"][b]))
    assert seen == list(range(len(dataset)))


def test_batched_loader_two_workers_random_order_and_kept_batches_stay_intact(mixed):
    dataset = PreparedSliceDataset(mixed.root)
    generator = torch.Generator().manual_seed(3)
    # batch 1 -> 18 batches in flight over 2 workers, more than each worker's 8 recycled buffers:
    # every batch is kept until the end, so a buffer reused too early would show up as wrong pixels.
    kept = [batch for epoch in range(2) for batch in batched_loader(dataset, 1, generator=generator, num_workers=2)]
    order = [int(batch["index"][0]) for batch in kept]
    assert sorted(order[:18]) == list(range(18)) and sorted(order[18:]) == list(range(18))
    assert order[:18] != list(range(18))  # shuffled
    for batch in kept:
        item = {key: value[0] for key, value in batch.items()}
        assert_item_matches(mixed, item)


def test_batched_loader_recycles_dropped_batches_correctly(mixed):
    dataset = PreparedSliceDataset(mixed.root, dtype=torch.float16)
    for epoch in range(3):
        loader = batched_loader(dataset, 5, generator=torch.Generator().manual_seed(epoch), num_workers=2)
        seen = []
        for batch in loader:  # each batch is dropped before the next: buffers get reused
            for b in range(len(batch["index"])):
                assert_item_matches(mixed, {key: value[b] for key, value in batch.items()})
            seen += batch["index"].tolist()
        assert sorted(seen) == list(range(len(dataset)))


def test_empty_selection_warns(mixed, caplog):
    dataset = PreparedSliceDataset(mixed.root, domains="mr/brain")
    assert len(dataset) == 0
    assert "no rows with domain in ['mr/brain']" in caplog.text


def test_batched_loader_in_the_main_process_and_without_shuffle(mixed):
    dataset = PreparedSliceDataset(mixed.root, split="train")
    batches = list(batched_loader(dataset, 4, shuffle=False, num_workers=0))
    assert [len(b["index"]) for b in batches] == [4, 4, 3]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(11))
    for batch in batches:
        assert_item_matches(mixed, {key: value[0] for key, value in batch.items()})


def test_batched_loader_refuses_a_collate_fn(mixed):
    with pytest.raises(ConfigError, match="collate_fn"):
        batched_loader(PreparedSliceDataset(mixed.root), 4, collate_fn=list)
