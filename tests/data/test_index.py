"""Index schema: building rows, writing, reading, version and column checks, documentation."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import medaug.data.index as index_module
from medaug.data.index import (
    INDEX_COLUMNS,
    INDEX_SCHEMA_VERSION,
    VERSION_KEY,
    IndexSchemaError,
    index_schema,
    intensity_from_json,
    make_slice_id,
    read_index,
    read_index_frame,
    rows_to_table,
    write_index,
)
from tests.data.conftest import make_rows


def _rows(count: int = 3) -> list[dict]:
    rows = make_rows("0123456789abcdef", count, ["t2", "adc"], domain="mr/prostate")
    for row in rows:
        row["slice_id"] = make_slice_id(row["volume_id"], row["slice_index"])
        row.update(height=16, width=16, shard="shards/0123456789abcdef", shard_row=row["slice_index"] - 10)
    return rows


def test_round_trip_keeps_every_value(tmp_path):
    rows = _rows()
    rows[1]["fingerprint"] = b"\x01\x02"
    path = write_index(rows_to_table(rows), tmp_path / "index.parquet")
    back = read_index(path).to_pylist()
    assert [r["slice_id"] for r in back] == ["0123456789abcdef:0010", "0123456789abcdef:0011", "0123456789abcdef:0012"]
    for original, read in zip(rows, back):
        np.testing.assert_array_equal(np.reshape(read["affine"], (4, 4)), original["affine"])
        assert read["spacing_mm"] == original["spacing_mm"]
        assert read["channels"] == ["t2", "adc"]
        assert intensity_from_json(read["intensity"]) == original["intensity"]
        assert read["synthetic"] is False
    assert back[1]["fingerprint"] == b"\x01\x02" and back[0]["fingerprint"] is None
    assert pq.read_schema(path).metadata[VERSION_KEY] == str(INDEX_SCHEMA_VERSION).encode()


def test_schema_types_survive_parquet(tmp_path):
    path = write_index(rows_to_table(_rows()), tmp_path / "index.parquet")
    schema = read_index(path).schema
    for field in index_schema():
        assert schema.field(field.name).type == field.type, field.name
    assert schema.field("affine").type == pa.list_(pa.float64(), 16)


def test_dict_of_lists_equals_list_of_dicts():
    rows = _rows()
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    assert rows_to_table(columns).equals(rows_to_table(rows))


def test_extra_columns_are_kept_after_index_columns(tmp_path):
    rows = _rows()
    for number, row in enumerate(rows):
        row["seed"] = 100 + number
        row["condition"] = [1.0, 0.0]
    path = write_index(rows_to_table(rows), tmp_path / "manifest.parquet")
    table = read_index(path)
    assert table.column_names == [*INDEX_COLUMNS, "seed", "condition"]
    assert table.column("seed").to_pylist() == [100, 101, 102]


def _write_with_metadata(path, table: pa.Table, metadata: dict | None) -> None:
    pq.write_table(table.replace_schema_metadata(metadata), path)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({VERSION_KEY: b"2"}, "index schema version 2; this medaug reads version 1"),
        (None, "not a medaug index"),
    ],
    ids=["future-version", "no-version"],
)
def test_wrong_or_missing_version_is_a_one_line_error_naming_the_file(tmp_path, metadata, expected):
    path = tmp_path / "index.parquet"
    _write_with_metadata(path, rows_to_table(_rows()), metadata)
    with pytest.raises(IndexSchemaError) as error:
        read_index(path)
    message = str(error.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "index.parquet"
    table = rows_to_table(_rows()).drop_columns(["shard_row", "plane"])
    _write_with_metadata(path, table, {VERSION_KEY: b"1"})
    with pytest.raises(IndexSchemaError, match=r"missing index columns \['plane', 'shard_row'\]"):
        read_index(path)


def test_wrong_column_type_is_named(tmp_path):
    path = tmp_path / "index.parquet"
    table = rows_to_table(_rows())
    table = table.set_column(table.schema.get_field_index("slice_index"), "slice_index",
                             table.column("slice_index").cast(pa.int64()))
    _write_with_metadata(path, table, {VERSION_KEY: b"1"})
    with pytest.raises(IndexSchemaError, match="'slice_index' has type int64; expected int32"):
        read_index(path)


def test_not_parquet_is_a_schema_error(tmp_path):
    path = tmp_path / "index.parquet"
    path.write_text("not parquet")
    with pytest.raises(IndexSchemaError, match="not readable as parquet"):
        read_index(path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda rows: [r.pop("domain") for r in rows], "missing columns \\['domain'\\]"),
        (lambda rows: rows[1].update(subject=None), "'subject' has 1 nulls"),
        (lambda rows: rows[0].update(split="training"), "holds \\['training'\\]"),
        (lambda rows: rows[2].update(structure_pixels=[1, 2]), "row 2: structure_pixels"),
        (lambda rows: rows[0].update(slice_index="ten"), "'slice_index' does not convert to int32"),
        (lambda rows: rows[0].update(affine=np.eye(3)), "'affine' needs a 4x4 matrix"),
    ],
    ids=["missing-column", "null", "bad-split", "pixels-length", "bad-type", "affine-3x3"],
)
def test_bad_rows_are_refused_with_the_column_named(change, expected):
    rows = _rows()
    change(rows)
    with pytest.raises(IndexSchemaError, match=expected):
        rows_to_table(rows)


def test_optional_columns_take_their_defaults():
    rows = _rows()
    for row in rows:
        for name in ("split", "source_label", "fingerprint", "synthetic"):
            row.pop(name, None)
    table = rows_to_table(rows)
    assert table.column("split").null_count == 3
    assert table.column("synthetic").to_pylist() == [False] * 3


def test_frame_reader_selects_columns(tmp_path):
    path = write_index(rows_to_table(_rows()), tmp_path / "index.parquet")
    frame = read_index_frame(path, columns=["slice_id", "shard_row"])
    assert list(frame.columns) == ["slice_id", "shard_row"]
    assert frame["shard_row"].tolist() == [0, 1, 2]


def test_docstring_table_documents_exactly_the_schema():
    documented = re.findall(r"^(\w+)\s{2,}(\S.*?)\s{2,}", index_module.__doc__, flags=re.MULTILINE)
    names = [name for name, _ in documented if name != "column"]  # "column" is the header
    assert names == list(INDEX_COLUMNS)
    nullable_documented = {name for name, kind in documented if "(nullable)" in kind}
    nullable_schema = {field.name for field in index_schema() if field.nullable}
    assert nullable_documented == nullable_schema


def test_dataframe_round_trip_after_edits(tmp_path):
    path = write_index(rows_to_table(_rows()), tmp_path / "index.parquet")
    frame = read_index(path).to_pandas()
    frame["split"] = ["train", "val", "test"]
    again = write_index(frame, tmp_path / "edited.parquet")
    table = read_index(again)
    assert table.column("split").to_pylist() == ["train", "val", "test"]
    assert table.drop_columns(["split"]).equals(read_index(path).drop_columns(["split"]))


def test_empty_split_means_not_split_yet():
    rows = _rows()
    for row in rows:
        row["split"] = ""
    assert rows_to_table(rows).column("split").null_count == 3
