"""``pipeline/sinks.py``: Parquet and CSV writers on real files, read back with pyarrow and
Python's ``csv`` module (not with the package's readers alone)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema, sinks


def assert_same_rows(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Same columns and values; numeric dtypes must match, text columns may come back as
    either of pandas' string dtypes (which one depends on how the file was read)."""
    assert list(got.columns) == list(expected.columns)
    assert len(got) == len(expected)
    for column in expected.columns:
        if pd.api.types.is_string_dtype(expected[column]):
            as_list = lambda s: [None if pd.isna(v) else v for v in s]  # noqa: E731
            assert as_list(got[column]) == as_list(expected[column]), column
        else:
            pd.testing.assert_series_equal(
                got[column].reset_index(drop=True), expected[column].reset_index(drop=True)
            )


def is_text(field: pa.Field) -> bool:
    return pa.types.is_string(field.type) or pa.types.is_large_string(field.type)


RUN = {"config": {"train": {"n_clusters": 3}}, "seed": 7, "versions": {"numpy": "x"}}


def objects_frame() -> pd.DataFrame:
    """Seven objects with ids in CSV order but with gaps (rejected rows left out), text
    that needs quoting, and two carried-through columns."""
    return pd.DataFrame(
        {
            "object_id": np.array([0, 2, 3, 5, 8, 9, 11], dtype=np.int64),
            "source_row": np.array([0, 2, 4, 6, 9, 10, 12], dtype=np.int64),
            "batch_folder": ["b1"] * 4 + ["b2"] * 3,
            "username": ["ann", "ann", 'bo "b"', "cé", "cé", "dan", "dan"],
            "res_name": [f"r{i}" for i in range(7)],
            "bbox": [
                "[0, 0, 10, 10]",
                "[1, 2, 3, 4]",
                "[0, 0, 1, 1]",
                "[5, 5, 6, 7]",
                "[0, 0, 2, 2]",
                "[1, 1, 1, 1]",
                "[0, 1, 2, 3]",
            ],  # fmt: skip
            "tag": ["shoe", "bag", "shoe", "face", "shoe", "bag", "hat"],
            "score": [0.5, 0.25, 1.0, 0.75, 0.125, 0.5, 0.0],
            "idx": np.array([0, 1, 0, 0, 1, 0, 2], dtype=np.int64),
            "image_name": ["i1", "i1", "i2", "i3", "i3", "i4", "i4"],
            "bbox_ok": [True] * 7,
            "camera": ["x", "y", None, "x", "y", "x", "z"],  # extra: text
            "quality": [1.5, 2.5, 3.5, np.nan, 5.5, 6.5, 7.5],  # extra: float
        }
    )


def test_write_parquet_round_trip_with_schema_and_metadata(tmp_path):
    frame = objects_frame()
    url = str(tmp_path / "objects.parquet")
    assert sinks.write_parquet(frame, url, schema.OBJECTS_SCHEMA, RUN) == url
    written = pq.read_schema(url)
    # The declared fields exactly (types, nullability, order), then the carried columns.
    assert written.names == [*schema.OBJECTS_SCHEMA.names, "camera", "quality"]
    for field in schema.OBJECTS_SCHEMA:
        assert written.field(field.name).equals(field), field.name
    assert is_text(written.field("camera")) and written.field("quality").type == pa.float64()
    assert sinks.read_run_metadata(url) == RUN
    assert json.loads(written.metadata[b"pipeline"]) == RUN
    assert_same_rows(pq.read_table(url).to_pandas(), frame)
    assert_same_rows(sinks.read_parquet(url), frame)
    got = sinks.read_parquet(url, columns=["object_id", "tag"], filters=[("tag", "==", "shoe")])
    assert got["object_id"].tolist() == [0, 3, 8]
    assert [p.name for p in tmp_path.iterdir()] == ["objects.parquet"]


def test_write_parquet_without_metadata_and_non_json_values(tmp_path):
    frame = objects_frame()
    sinks.write_parquet(frame, str(tmp_path / "a.parquet"), schema.OBJECTS_SCHEMA)
    assert sinks.read_run_metadata(str(tmp_path / "a.parquet")) == {}
    sinks.write_parquet(frame, str(tmp_path / "b.parquet"), schema.OBJECTS_SCHEMA,
                        {"path": Path("/data/x.csv")})  # fmt: skip
    assert sinks.read_run_metadata(str(tmp_path / "b.parquet")) == {"path": "/data/x.csv"}


def test_write_parquet_replaces_an_older_file(tmp_path):
    url = str(tmp_path / "t.parquet")
    sinks.write_parquet(objects_frame(), url, schema.OBJECTS_SCHEMA, {"run": 1})
    sinks.write_parquet(objects_frame().head(2), url, schema.OBJECTS_SCHEMA, {"run": 2})
    assert len(sinks.read_parquet(url)) == 2 and sinks.read_run_metadata(url) == {"run": 2}


def test_to_table_declared_types_first_then_extra_columns():
    frame = objects_frame()
    # Columns in another order, score as int and idx as float: the schema's types win.
    frame = frame[list(reversed(frame.columns))].assign(
        score=np.arange(7), idx=np.arange(7, dtype=np.float64)
    )
    table = sinks.to_table(frame, schema.OBJECTS_SCHEMA)
    assert table.column_names == [*schema.OBJECTS_SCHEMA.names, "quality", "camera"]
    assert table.schema.field("score").type == pa.float64()
    assert table.schema.field("idx").type == pa.int64()
    assert is_text(table.schema.field("camera"))
    assert table.schema.field("quality").type == pa.float64()
    assert table.column("camera").to_pylist() == ["x", "y", None, "x", "y", "x", "z"]
    assert table.column("quality").null_count == 1  # NaN from pandas becomes null
    assert table.column("score").to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_to_table_missing_declared_column_raises():
    with pytest.raises(KeyError):
        sinks.to_table(objects_frame().drop(columns=["tag"]), schema.OBJECTS_SCHEMA)


def clusters_frame() -> pd.DataFrame:
    frame = objects_frame()
    return frame.assign(
        cluster=np.array([2, 2, 0, 1, 1, 0, 2], dtype=np.int32),
        dist=np.array([0.5, 1.25, 2.0, 0.0, 3.5, 0.75, 1.0], dtype=np.float32),
        sim=np.array([0.875, 0.5, -0.25, 1.0, 0.125, 0.75, 0.0625], dtype=np.float32),
        status="kept",
    )


def test_write_csv_exactly_the_given_columns_in_order(tmp_path):
    frame = clusters_frame()
    shuffled = frame[list(reversed(frame.columns))]
    url = str(tmp_path / "ins_posts_clusters.csv")
    sinks.write_csv(shuffled, url, schema.OUTPUT_CSV_FIELDS, schema.CLUSTERS_SCHEMA)
    with open(url, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == schema.OUTPUT_CSV_FIELDS == (
        "batch_folder", "username", "res_name", "bbox", "tag", "score", "idx", "image_name",
        "cluster", "dist", "sim",
    )  # fmt: skip
    assert len(rows) == 1 + len(frame)
    for line, (_, expected) in zip(rows[1:], frame.iterrows(), strict=True):
        record = dict(zip(rows[0], line, strict=True))
        for column in ("batch_folder", "username", "res_name", "bbox", "tag", "image_name"):
            assert record[column] == expected[column]  # commas and quotes survive quoting
        assert float(record["score"]) == expected["score"]
        assert int(record["idx"]) == expected["idx"]
        assert int(record["cluster"]) == expected["cluster"]
        assert np.float32(float(record["dist"])) == expected["dist"]
        assert np.float32(float(record["sim"])) == expected["sim"]


def test_write_csv_group_fields(tmp_path):
    frame = clusters_frame().assign(group=["shoes", "shoes", "bags", "x,y", "x,y", "bags", "s"])
    url = str(tmp_path / "g.csv")
    sinks.write_csv(frame, url, schema.GROUPS_CSV_FIELDS, schema.GROUPS_SCHEMA)
    with open(url, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [*schema.OUTPUT_CSV_FIELDS, "group"]
    assert [r["group"] for r in rows] == ["shoes", "shoes", "bags", "x,y", "x,y", "bags", "s"]


def test_write_object_parts_row_aligned_with_store_ids(tmp_path):
    objects = objects_frame()
    store_ids = np.array([9, 0, 5, 11, 3, 2, 8])  # a shuffle of the object ids
    url = str(tmp_path / "objects.parquet")
    sinks.write_object_parts(objects, store_ids, url, chunk_rows=3, progress=False)
    names = sorted(p.name for p in Path(url).iterdir())
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [Path(p).name for p in sinks.part_urls(url)] == names
    by_id = objects.set_index("object_id", drop=False)
    for part, ids in enumerate([[9, 0, 5], [11, 3, 2], [8]]):
        got = sinks.read_parquet_part(url, part)
        expected = by_id.loc[ids].reset_index(drop=True)
        assert_same_rows(got, expected)
        assert pq.read_schema(f"{url}/part-{part:05d}.parquet").field("object_id").nullable is False
    # Read as one table, the rows follow the store: row i is the object at store row i.
    assert sinks.read_parquet(url)["object_id"].tolist() == store_ids.tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["objects.parquet"]


def test_write_parquet_dataset_from_dask_frame(tmp_path):
    frame = clusters_frame()[[*schema.ASSIGNMENTS_SCHEMA.names]]
    ddf = dd.from_pandas(frame, npartitions=3, sort=False)
    url = str(tmp_path / "postprocessed.parquet")
    sinks.write_parquet_dataset(ddf, url, schema.ASSIGNMENTS_SCHEMA, RUN)
    parts = sinks.part_urls(url)
    assert [Path(p).name for p in parts] == [f"part-{i:05d}.parquet" for i in range(3)]
    for i, part in enumerate(parts):
        assert pq.read_schema(part).remove_metadata().equals(schema.ASSIGNMENTS_SCHEMA)
        expected = ddf.partitions[i].compute().reset_index(drop=True)
        assert_same_rows(sinks.read_parquet_part(url, i), expected)
    assert_same_rows(sinks.read_parquet(url), frame)
    assert sinks.read_run_metadata(url) == RUN  # from the folder's first part
    assert [p.name for p in tmp_path.iterdir()] == ["postprocessed.parquet"]


def test_json_and_text_writers(tmp_path):
    url = str(tmp_path / "sub" / "m.json")
    sinks.write_json({"b": [1, 2], "a": Path("/p")}, url)
    assert sinks.read_json(url) == {"a": "/p", "b": [1, 2]}
    assert json.loads(Path(url).read_text()) == {"a": "/p", "b": [1, 2]}
    sinks.write_text("# title\n", str(tmp_path / "s.md"))
    assert (tmp_path / "s.md").read_text() == "# title\n"


def test_package_versions_cover_the_result_shaping_packages():
    versions = sinks.package_versions()
    assert set(versions) == {"numpy", "dask", "distributed", "zarr", "scikit-learn", "pandas",
                             "pyarrow"}  # fmt: skip
    assert versions["numpy"] == np.__version__
    assert versions["pyarrow"] == pa.__version__
