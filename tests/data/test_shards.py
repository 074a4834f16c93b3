"""Shards: round trip, validation, kill and resume, deterministic assembly, the reader's caches."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from medaug.data.index import read_index
from medaug.data.shards import (
    PARTS_DIR,
    ShardError,
    ShardStore,
    ShardWriter,
    assemble_index,
    completed_volume_ids,
    image_path,
    label_path,
    shard_stem,
)
from tests.conftest import REPO_ROOT
from tests.data.conftest import MIXED_SPECS, make_rows, random_volume, write_tiny

VOLUME = "feedfacecafe0001"


def test_round_trip_equals_input_at_float16(mixed):
    store = ShardStore(mixed.root)
    table = read_index(mixed.root / "index.parquet")
    assert table.num_rows == sum(spec["slices"] for spec in MIXED_SPECS)
    for row in table.to_pylist():
        image_CHW, label_HW = store.read(row["shard"], row["shard_row"])
        expected = mixed.images[row["volume_id"]][row["shard_row"]]
        assert image_CHW.dtype == np.float16
        np.testing.assert_array_equal(image_CHW, expected.astype(np.float16))
        np.testing.assert_allclose(image_CHW, expected, atol=2**-11)  # float16 spacing below 1
        if mixed.labels[row["volume_id"]] is None:
            assert label_HW is None
        else:
            np.testing.assert_array_equal(label_HW, mixed.labels[row["volume_id"]][row["shard_row"]])


def test_read_many_zero_fills_channels_and_ignores_unlabelled(mixed):
    store = ShardStore(mixed.root)
    picks = [("b000000000000002", 3), ("a000000000000001", 0), ("c000000000000003", 2), ("a000000000000001", 4)]
    images = np.full((4, 2, 16, 16), 7.0, dtype=np.float32)
    labels = np.zeros((4, 16, 16), dtype=np.uint8)
    labelled = store.read_many([shard_stem(v) for v, _ in picks], [r for _, r in picks], images, labels)
    np.testing.assert_array_equal(labelled, [True, True, False, True])
    for b, (volume, row) in enumerate(picks):
        source = mixed.images[volume][row].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(images[b, : source.shape[0]], source)
        assert np.all(images[b, source.shape[0]:] == 0)
        expected_label = mixed.labels[volume][row] if mixed.labels[volume] is not None else np.full((16, 16), 255)
        np.testing.assert_array_equal(labels[b], expected_label)


def test_rows_get_shard_fields_and_slice_ids(mixed):
    table = read_index(mixed.root / "index.parquet")
    rows = [r for r in table.to_pylist() if r["volume_id"] == "d000000000000004"]
    assert [r["shard_row"] for r in rows] == list(range(6))
    assert {r["shard"] for r in rows} == {"shards/d000000000000004"}
    assert [r["slice_id"] for r in rows] == [f"d000000000000004:{10 + k:04d}" for k in range(6)]
    assert {(r["height"], r["width"]) for r in rows} == {(16, 16)}


@pytest.mark.parametrize(
    ("images", "labels", "rows", "expected"),
    [
        (np.zeros((2, 1, 8, 8)), np.zeros((2, 8, 9), np.uint8), 2, "expected uint8 \\(2, 8, 8\\)"),
        (np.zeros((2, 1, 8, 8)), np.zeros((2, 8, 8), np.int32), 2, "labels are int32"),
        (np.zeros((2, 1, 8, 8)), None, 3, "3 rows for 2 slices"),
        (np.full((2, 1, 8, 8), 1.5), None, 2, "expected model space"),
        (np.full((2, 1, 8, 8), np.nan), None, 2, "not finite"),
        (np.full((2, 1, 8, 8), -1.5, dtype=np.float16), None, 2, "expected model space"),  # float16 input
        (np.zeros((2, 8, 8)), None, 2, "expected \\(N>0, C, H, W\\)"),
        (np.zeros((2, 1, 8, 8), np.int16), None, 2, "dtype int16"),
    ],
    ids=["label-shape", "label-dtype", "row-count", "out-of-range", "nan", "float16-out-of-range", "3d", "int-images"],
)
def test_bad_volumes_are_refused_and_nothing_is_written(tmp_path, images, labels, rows, expected):
    writer = ShardWriter(tmp_path, fsync=False)
    with pytest.raises(ShardError, match=expected):
        writer.write_volume(VOLUME, images, labels, make_rows(VOLUME, rows, ["ct"]))
    assert not writer.is_complete(VOLUME)
    assert not image_path(tmp_path, shard_stem(VOLUME)).exists()


def test_row_with_wrong_volume_or_slice_id_is_refused(tmp_path):
    writer = ShardWriter(tmp_path, fsync=False)
    images, labels = random_volume(np.random.default_rng(0), 2, 1)
    rows = make_rows(VOLUME, 2, ["ct"])
    rows[1]["slice_id"] = f"{VOLUME}:9999"
    with pytest.raises(ShardError, match="row 1: slice_id"):
        writer.write_volume(VOLUME, images, labels, rows)
    rows = make_rows("0000000000000000", 2, ["ct"])
    with pytest.raises(ShardError, match="row 0: volume_id"):
        writer.write_volume(VOLUME, images, labels, rows)


def test_rewriting_a_volume_replaces_it(tmp_path):
    writer = ShardWriter(tmp_path, fsync=False)
    rng = np.random.default_rng(1)
    first, labels = random_volume(rng, 3, 1)
    writer.write_volume(VOLUME, first, labels, make_rows(VOLUME, 3, ["ct"]))
    second, _ = random_volume(rng, 2, 1)
    writer.write_volume(VOLUME, second, None, make_rows(VOLUME, 2, ["ct"], labelled=False))
    assert assemble_index(tmp_path).num_rows == 2
    assert not label_path(tmp_path, shard_stem(VOLUME)).exists()  # the old labels do not linger
    image_CHW, label_HW = ShardStore(tmp_path).read(shard_stem(VOLUME), 1)
    np.testing.assert_array_equal(image_CHW, second[1].astype(np.float16))
    assert label_HW is None


# A child process writes one volume and is SIGKILLed at a chosen point: no cleanup code runs, as in a
# real kill. {kill_point} patches the function the writer calls at that point.
_CHILD = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {repo!r})
import medaug.data.shards as shards
import medaug.data.index as index
from tests.data.conftest import make_rows, random_volume

def die(*args, **kwargs):
    handle = args[0] if args and hasattr(args[0], "write") else (args[1] if len(args) > 1 else None)
    if hasattr(handle, "write"):
        handle.write(b"partial bytes")
        handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

{kill_point}
images, labels = random_volume(np.random.default_rng(5), 4, 2)
rows = make_rows({volume!r}, 4, ["t2", "adc"])
shards.ShardWriter({root!r}, fsync=False).write_volume({volume!r}, images, labels, rows)
"""

_KILL_POINTS = {
    "during-image": "np.save = die",
    "before-parts": "shards.write_index = die",
    "during-parts": "index.pq.write_table = die",
}


def _write_killed(root: Path, kill_point: str) -> int:
    code = _CHILD.format(repo=str(REPO_ROOT), root=str(root), volume=VOLUME, kill_point=_KILL_POINTS[kill_point])
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    return result.returncode


@pytest.mark.parametrize("kill_point", list(_KILL_POINTS))
def test_killed_write_never_looks_complete_and_resume_matches_a_clean_run(tmp_path, kill_point):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    other = [{"volume_id": "0000000000000aaa", "slices": 3, "channels": ["t2", "adc"]}]
    write_tiny(killed, other, seed=3)
    _write_killed(killed, kill_point)
    writer = ShardWriter(killed, fsync=False)
    assert not writer.is_complete(VOLUME)
    assert completed_volume_ids(killed) == ["0000000000000aaa"]
    assert assemble_index(killed).num_rows == 3  # the killed volume contributes nothing
    leftovers = sorted(p.name for p in killed.rglob(".part-*"))
    if kill_point != "before-parts":
        assert leftovers, "a kill inside an atomic write leaves its temporary file"
    removed = writer.cleanup_stale()
    assert sorted(p.name for p in removed) == leftovers
    assert not list(killed.rglob(".part-*"))

    images, labels = random_volume(np.random.default_rng(5), 4, 2)  # the child's arrays, again
    writer.write_volume(VOLUME, images, labels, make_rows(VOLUME, 4, ["t2", "adc"]))
    write_tiny(clean, other, seed=3)
    ShardWriter(clean, fsync=False).write_volume(VOLUME, images, labels, make_rows(VOLUME, 4, ["t2", "adc"]))
    assert assemble_index(killed).equals(assemble_index(clean))


def test_is_complete_only_once_the_parts_file_exists(tmp_path):
    writer = ShardWriter(tmp_path, fsync=False)
    images, labels = random_volume(np.random.default_rng(0), 2, 1)
    writer.write_volume(VOLUME, images, labels, make_rows(VOLUME, 2, ["ct"]))
    assert writer.is_complete(VOLUME) and writer.completed_volumes() == {VOLUME}
    (tmp_path / PARTS_DIR / f"{VOLUME}.parquet").unlink()
    assert not writer.is_complete(VOLUME)


def test_cleanup_keeps_temporary_files_of_live_writers(tmp_path):
    writer = ShardWriter(tmp_path, fsync=False)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / "shards" / f".part-{sleeper.pid}-x.image.npy"
        dead = tmp_path / "shards" / ".part-999999999-y.image.npy"
        live.write_bytes(b"x")
        dead.write_bytes(b"y")
        assert writer.cleanup_stale() == [dead]
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_assembled_order_does_not_depend_on_write_order(tmp_path):
    specs = [
        {"volume_id": f"{number:016x}", "slices": 3, "channels": ["ct"]} for number in (9, 2, 14, 5)
    ]
    forward = assemble_index(write_tiny(tmp_path / "forward", specs).root)
    backward = assemble_index(write_tiny(tmp_path / "backward", specs[::-1]).root)
    assert forward.equals(backward)
    keys = list(zip(forward.column("volume_id").to_pylist(), forward.column("slice_index").to_pylist()))
    assert keys == sorted(keys)


def test_assemble_merges_parts_with_extra_columns(tmp_path):
    writer = ShardWriter(tmp_path, fsync=False)
    rng = np.random.default_rng(0)
    for volume, extra in (("0000000000000001", None), ("0000000000000002", 7)):
        rows = make_rows(volume, 2, ["ct"])
        if extra is not None:
            for row in rows:
                row["seed"] = extra
        writer.write_volume(volume, *random_volume(rng, 2, 1), rows)
    table = assemble_index(tmp_path)
    assert table.column("seed").to_pylist() == [None, None, 7, 7]


def test_store_pickles_without_maps_and_limits_open_shards(mixed):
    store = ShardStore(mixed.root, max_open=2)
    table = read_index(mixed.root / "index.parquet")
    shards = pc.unique(table.column("shard")).to_pylist()
    for shard in shards:
        store.read(shard, 0)
    assert len(store._maps) == 2
    clone = pickle.loads(pickle.dumps(store))
    assert len(clone._maps) == 0
    image_CHW, _ = clone.read(shards[0], 1)
    np.testing.assert_array_equal(image_CHW, mixed.images[shards[0].split("/")[1]][1].astype(np.float16))


def test_missing_or_truncated_shard_is_a_shard_error(tmp_path):
    with pytest.raises(ShardError, match="cannot open shard"):
        ShardStore(tmp_path).read("shards/0000000000000000", 0)
    writer = ShardWriter(tmp_path, fsync=False)
    writer.write_volume(VOLUME, *random_volume(np.random.default_rng(0), 3, 1), make_rows(VOLUME, 3, ["ct"]))
    path = image_path(tmp_path, shard_stem(VOLUME))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardError, match="cannot open shard"):
        ShardStore(tmp_path).read(shard_stem(VOLUME), 0)

