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


# ----------------------------------------------------------------------------- streamed writers


def test_csv_bytes_header_then_row_ranges_equal_write_csv(tmp_path):
    frame = clusters_frame()
    url = str(tmp_path / "whole.csv")
    sinks.write_csv(frame, url, schema.OUTPUT_CSV_FIELDS, schema.CLUSTERS_SCHEMA)
    args = (schema.OUTPUT_CSV_FIELDS, schema.CLUSTERS_SCHEMA)
    header = sinks.csv_bytes(frame.iloc[:0], *args, header=True)
    pieces = [
        sinks.csv_bytes(frame.iloc[a:b], *args, header=False) for a, b in [(0, 3), (3, 3), (3, 7)]
    ]
    assert header + b"".join(pieces) == Path(url).read_bytes()
    assert header.count(b"\n") == 1 and pieces[1] == b""


def test_concat_files_head_then_files_in_order(tmp_path):
    names = []
    for i, text in enumerate([b"a,b\n" * 3, b"", b"x" * 10]):
        (tmp_path / f"p{i}").write_bytes(text)
        names.append(str(tmp_path / f"p{i}"))
    url = str(tmp_path / "out" / "all.csv")
    sinks.concat_files(names, url, head=b"H\n", block_bytes=4)
    assert Path(url).read_bytes() == b"H\n" + b"a,b\n" * 3 + b"x" * 10
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["all.csv"]


def test_ipc_batches_read_back_one_at_a_time_empty_ones_too(tmp_path):
    table = pa.Table.from_pandas(clusters_frame(), preserve_index=False)
    batch = table.combine_chunks().to_batches()[0]
    pieces = [batch.slice(0, 2), batch.slice(2, 0), batch.slice(2, 5)]
    url = str(tmp_path / "split.arrow")
    sinks.write_ipc_batches(pieces, table.schema, url)
    for i, piece in enumerate(pieces):
        assert sinks.read_ipc_batch(url, i).equals(piece)
    sinks.write_ipc_table(table, str(tmp_path / "t.arrow"))
    assert sinks.read_ipc_table(str(tmp_path / "t.arrow")).equals(table)


def test_unify_piece_schemas_as_the_whole_table_conversion_infers():
    meta = {b"pandas": b"{}"}
    a = pa.schema([("x", pa.int64()), ("y", pa.null()), ("z", pa.large_string())], metadata=meta)
    b = pa.schema([("x", pa.float64()), ("y", pa.bool_()), ("z", pa.large_string())])
    got = sinks.unify_piece_schemas([a, b])
    assert got.types == [pa.float64(), pa.bool_(), pa.large_string()]
    assert got.metadata == meta
    assert sinks.unify_piece_schemas([a]).equals(a, check_metadata=True)


def write_pieces_and_whole(tmp_path, table, cuts, row_group_rows):
    """``table`` (Arrow) converted to pandas and written whole by write_parquet, and cut at
    ``cuts`` with each piece converted on its own (as post-processing's blocks are) and
    written by write_parquet_pieces."""
    whole = str(tmp_path / "whole.parquet")
    sinks.write_parquet(table.to_pandas(), whole, schema.CLUSTERS_SCHEMA, RUN)
    tables = [
        sinks.to_table(table.slice(a, b - a).to_pandas(), schema.CLUSTERS_SCHEMA)
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    unified = sinks.unify_piece_schemas([t.schema for t in tables if t.num_rows])
    pieces = str(tmp_path / "pieces.parquet")
    sinks.write_parquet_pieces(iter(tables), pieces, unified, RUN, row_group_rows=row_group_rows)
    return whole, pieces


def clusters_table() -> pa.Table:
    frame = clusters_frame().drop(columns="status")
    return pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)


def test_write_parquet_pieces_same_bytes_as_write_parquet_within_one_row_group(tmp_path):
    whole, pieces = write_pieces_and_whole(tmp_path, clusters_table(), [0, 2, 2, 5, 7], 1000)
    assert Path(pieces).read_bytes() == Path(whole).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pieces.parquet", "whole.parquet"]


def test_write_parquet_pieces_row_groups_read_as_the_whole_table(tmp_path):
    # Carried columns whose pandas form differs by piece: an integer column with a null in
    # one piece only (float there, int64 in the others), a text column all null in one
    # piece (null type there).
    table = clusters_table()
    table = table.append_column("count", pa.array([1, 2, 3, None, 5, 6, 7], pa.int64()))
    table = table.append_column("flag", pa.array([None, None, True, False, None, True, False]))
    whole, pieces = write_pieces_and_whole(tmp_path, table, [0, 2, 4, 7], 3)
    got, expected = pq.ParquetFile(pieces), pq.ParquetFile(whole)
    assert [got.metadata.row_group(i).num_rows for i in range(got.num_row_groups)] == [3, 3, 1]
    assert got.schema_arrow.equals(expected.schema_arrow, check_metadata=True)
    assert got.read().equals(expected.read())
    assert expected.schema_arrow.field("count").type == pa.float64()
    assert sinks.read_run_metadata(pieces) == RUN


def test_write_parquet_pieces_of_nothing_is_the_empty_table(tmp_path):
    frame = clusters_table().slice(0, 0).to_pandas()
    whole = str(tmp_path / "whole.parquet")
    sinks.write_parquet(frame, whole, schema.CLUSTERS_SCHEMA, RUN)
    empty = sinks.to_table(frame, schema.CLUSTERS_SCHEMA)
    pieces = str(tmp_path / "pieces.parquet")
    sinks.write_parquet_pieces(iter([]), pieces, empty.schema, RUN)
    assert Path(pieces).read_bytes() == Path(whole).read_bytes()
