import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import sinks
from pipeline.config import Config
from pipeline.ingest.objects import _is_bbox, read_objects_csv, stream_objects_csv, valid_bboxes
from tests.conftest import config_for, ingest_only, load_vectors


def ingest_into(cfg):
    return ingest_only(cfg)


def read_store(paths):
    group = zarr.open_group(paths.store, mode="r")
    return group["vectors"][:], group["object_ids"][:]


@pytest.mark.parametrize("fixture", ["small_dataset", "matrix_dataset"])
def test_round_trip_every_row_equals_its_input_vector(request, tmp_path, fixture):
    dataset = request.getfixturevalue(fixture)
    cfg = config_for(dataset, tmp_path / "out", ingest={"keep_memmap": True})
    result, paths = ingest_into(cfg)
    assert result.n_rows == dataset.n_objects and result.n_rejected == 0
    vectors, ids = read_store(paths)
    objects = sinks.read_parquet(paths.objects)
    # The objects table is row-aligned with the store.
    np.testing.assert_array_equal(objects["object_id"].to_numpy(), ids)
    expected = load_vectors(dataset, objects)
    np.testing.assert_array_equal(vectors, expected)
    # The staging memmap holds the same vectors in CSV order.
    memmap = np.memmap(result.memmap, dtype=np.float32, mode="r").reshape(-1, dataset.dim)
    np.testing.assert_array_equal(memmap[ids], expected)
    csv = read_objects_csv(str(dataset.objects_csv))
    by_id = objects.sort_values("object_id")
    assert by_id["source_row"].tolist() == list(range(len(csv)))
    assert by_id["image_name"].tolist() == csv["image_name"].tolist()


def test_store_is_a_seeded_permutation_with_whole_row_chunks(small_config):
    _, paths = ingest_into(small_config)
    group = zarr.open_group(paths.store, mode="r")
    assert group["vectors"].chunks == (256, 32)
    assert group["vectors"].dtype == np.float32
    _, ids = read_store(paths)
    assert sorted(ids) == list(range(len(ids)))
    expected = np.random.default_rng(small_config.train.seed).permutation(len(ids))
    np.testing.assert_array_equal(ids, expected)


def users_per_block(users: np.ndarray, block_rows: int) -> float:
    return float(
        np.mean([len(set(users[i : i + block_rows])) for i in range(0, len(users), block_rows)])
    )


def test_shuffled_blocks_mix_users_like_random_sampling(small_config):
    _, paths = ingest_into(small_config)
    objects = sinks.read_parquet(paths.objects)
    users_store_order = objects["username"].to_numpy()
    users_file_order = objects.sort_values("object_id")["username"].to_numpy()
    rng = np.random.default_rng(123)
    random_order = users_file_order[rng.permutation(len(users_file_order))]
    block = 256
    shuffled = users_per_block(users_store_order, block)
    sequential = users_per_block(users_file_order, block)
    random = users_per_block(random_order, block)
    # Sequential blocks hold a handful of users; store blocks hold as many as a random sample.
    assert sequential < 0.3 * random
    assert shuffled == pytest.approx(random, rel=0.1)
    # Also at the scale of one mini-batch inside a block.
    assert users_per_block(users_store_order, 64) == pytest.approx(
        users_per_block(random_order, 64), rel=0.1
    )


def test_selection_filters_rows_into_rejects(small_dataset, tmp_path):
    csv = pd.read_csv(small_dataset.objects_csv)
    tags = sorted(csv["tag"].unique())[:3]
    cfg = config_for(small_dataset, tmp_path / "out", select={"tags": tags, "min_score": 0.5},
                     train={"n_clusters": 5})  # fmt: skip
    result, paths = ingest_into(cfg)
    expected = csv[csv["tag"].isin(tags) & (csv["score"] >= 0.5)]
    assert result.n_rows == len(expected)
    objects = sinks.read_parquet(paths.objects)
    assert sorted(objects["source_row"]) == expected.index.tolist()
    rejects = sinks.read_parquet(paths.rejects)
    assert len(rejects) + result.n_rows == len(csv)
    assert set(rejects["reason"]) == {"not_selected:tag", "not_selected:score"}


def test_exclude_tags_removes_exactly_those_tags(small_dataset, tmp_path):
    csv = pd.read_csv(small_dataset.objects_csv)
    excluded = sorted(csv["tag"].unique())[-2:]
    cfg = config_for(small_dataset, tmp_path / "out", select={"exclude_tags": excluded},
                     train={"n_clusters": 5})  # fmt: skip
    result, paths = ingest_into(cfg)
    expected = csv[~csv["tag"].isin(excluded)]
    assert sorted(sinks.read_parquet(paths.objects)["source_row"]) == expected.index.tolist()
    rejects = sinks.read_parquet(paths.rejects)
    assert set(rejects["reason"]) == {"not_selected:tag"}
    assert sorted(rejects["source_row"]) == csv.index[csv["tag"].isin(excluded)].tolist()


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("[1, 2, 3, 4]", True),
        ("[1, 2, 1, 2]", True),  # a zero-size box is still a box
        ("[1, 4, 3, 2]", False),  # y1 > y2
        ("[3, 2, 1, 4]", False),  # x1 > x2
        ("[1, 2, 3]", False),
        ("[1, 2, 3, NaN]", False),
        ('["a", 2, 3, 4]', False),
        ("[true, 2, 3, 4]", False),
        # the other common spellings of a box
        ("1,2,3,4", True),
        ("10.5, 20, 30, 40.25", True),
        ("[1 2 3 4]", True),
        ("(1, 2, 3, 4)", True),
        (" ( 1 2 3 4 ) ", True),
        ("[1, 2, 3, 4)", False),  # mismatched brackets
        ("1,2,3", False),
        ("(3, 2, 1, 4)", False),  # x1 > x2 in any spelling
    ],
)
def test_bbox_rule_by_hand(text, ok):
    assert valid_bboxes(pd.Series([text])).tolist() == [ok]
    assert _is_bbox(text) is ok


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.lists(st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True)),
             min_size=0, max_size=5).map(json.dumps),
    st.text(alphabet="[]0123456789.,eE+- \"", max_size=30),
))  # fmt: skip
def test_vectorised_bbox_check_agrees_with_the_json_parser(text):
    assert valid_bboxes(pd.Series([text])).tolist() == [_is_bbox(text)]


# --------------------------------------------------------------------------- containment


def hostile_dataset(tmp_path):
    """A hand-built input whose rows name files outside the root (through every template
    field and through a link), a FIFO, a folder and a dangling link, next to good rows."""
    root = tmp_path / "emb"
    outside = tmp_path / "outside"
    outside.mkdir()
    rng = np.random.default_rng(0)
    vectors = {}

    def save(path, n=2):
        path.parent.mkdir(parents=True, exist_ok=True)
        vectors[str(path)] = rng.normal(size=(n, 8)).astype(np.float32)
        np.save(path, vectors[str(path)])

    rows = []
    for i in range(12):  # good rows: the run needs something to cluster
        save(root / "b" / f"u{i}" / "r" / f"img{i}.npy")
        rows += [("b", f"u{i}", "r", f"img{i}", 0), ("b", f"u{i}", "r", f"img{i}", 1)]
    save(outside / "secret.npy")
    save(root / "b" / "u0" / "r" / "inside_target.npy")
    (root / "b" / "u0" / "r" / "link_in.npy").symlink_to(
        root / "b" / "u0" / "r" / "inside_target.npy"
    )
    (root / "b" / "u0" / "r" / "link_out.npy").symlink_to(outside / "secret.npy")
    (root / "b" / "u0" / "r" / "dangling.npy").symlink_to(root / "b" / "u0" / "r" / "gone.npy")
    os.mkfifo(root / "b" / "u0" / "r" / "fifo.npy")
    (root / "b" / "u0" / "r" / "folder.npy").mkdir()
    (root / "b" / "evil").symlink_to(outside, target_is_directory=True)
    hostile = {
        "traversal in image_name": (
            "b",
            "u0",
            "r",
            "../../../../outside/secret",
            "path_outside_root",
        ),
        "traversal in username": ("b", "../../outside", ".", "secret", "path_outside_root"),
        "traversal in batch_folder": ("..", "outside", ".", "secret", "path_outside_root"),
        "traversal in res_name": ("b", "u0", "../../../outside", "secret", "path_outside_root"),
        # joined under the root as text, an absolute value stays inside it (and is missing)
        "absolute image_name": ("b", "u0", "r", str(outside / "secret"), "missing_embedding_file"),
        "link to outside": ("b", "u0", "r", "link_out", "path_outside_root"),
        "folder link to outside": ("b", "evil", ".", "secret", "path_outside_root"),
        "fifo": ("b", "u0", "r", "fifo", "not_a_regular_file"),
        "folder": ("b", "u0", "r", "folder", "not_a_regular_file"),
        "dangling link": ("b", "u0", "r", "dangling", "missing_embedding_file"),
        "link inside the root": ("b", "u0", "r", "link_in", ""),
    }
    for batch, user, res, image, _ in hostile.values():
        rows.append((batch, user, res, image, 0))
    frame = pd.DataFrame(
        rows, columns=["batch_folder", "username", "res_name", "image_name", "idx"]
    )
    frame["bbox"] = "[0, 0, 1, 1]"
    frame["tag"] = "t"
    frame["score"] = 0.9
    csv = tmp_path / "objects.csv"
    frame.to_csv(csv, index=False)
    return csv, root, hostile, vectors, outside


def test_paths_stay_inside_the_root_and_only_regular_files_are_read(tmp_path):
    csv, root, hostile, vectors, outside = hostile_dataset(tmp_path)
    cfg = Config.model_validate({
        "input": {"objects_csv": str(csv), "embeddings_root": str(root),
                  "embeddings_template": "{batch_folder}/{username}/{res_name}/{image_name}.npy"},
        "ingest": {"chunk_rows": 64}, "train": {"n_clusters": 2, "batch_size": 64},
        "output": {"dir": str(tmp_path / "out")}, "executor": {"progress": False},
    })  # fmt: skip
    result, catalog = ingest_only(cfg)  # returns at once: a FIFO never blocks the read
    rejects = sinks.read_parquet(catalog.rejects).set_index(["username", "image_name"])
    n_good = 24
    for name, (_, user, _, image, reason) in hostile.items():
        if reason:
            assert rejects.loc[(user, image), "reason"] == reason, name
            assert len(rejects.loc[(user, image), "detail"]) < 400, name
        else:
            assert (user, image) not in rejects.index, name
    assert result.n_rows == n_good + 1  # the good rows and the link that stays inside
    stored = zarr.open_group(catalog.store, mode="r")["vectors"][:]
    secret = vectors[str(outside / "secret.npy")]
    assert not any((stored == row).all(axis=1).any() for row in secret)  # nothing leaked


def test_legal_csv_with_huge_fields_and_quoted_line_breaks_is_read(tmp_path):
    header = "batch_folder,username,res_name,bbox,tag,score,idx,image_name,note"
    rows = [
        f'b,u{i},r,"[0, 0, 1, 1]",t,0.5,0,img{i},"line one\nline two, with a comma"'
        for i in range(3000)
    ]
    rows.append('b,big,r,"[0, 0, 1, 1]",t,0.5,0,img,' + "x" * 5_000_000)
    csv = tmp_path / "objects.csv"
    csv.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    table = read_objects_csv(str(csv))
    assert len(table) == 3001
    assert table["note"].iloc[0] == "line one\nline two, with a comma"
    assert len(table["note"].iloc[-1]) == 5_000_000 and table["username"].iloc[-1] == "big"


def test_a_block_cut_inside_a_quoted_value_falls_back_to_the_whole_parse(tmp_path):
    """The local read cuts the file at line breaks into blocks: a cut at a quoted line
    break leaves an unclosed quote, which the fast parse accepts, and the rest of the
    value reads as one more row. The line-break check sends the file to the whole parse:
    the rows are the file's (checked against pyarrow reading it in one piece)."""
    import pyarrow.csv as pacsv

    rows = objects_csv_rows(40)
    rows[20] = rows[20].replace(",x19", ',"x\nb,u9,r,[0 0 1 1],hat,0.5,0,img9,y"')
    path = tmp_path / "objects.csv"
    path.write_text("\n".join(rows) + "\n")
    cut = path.read_bytes().index(b'"x\n') + 3  # a block ends at the quoted line break
    got = []
    n = stream_objects_csv(str(path), got.append, got.clear, block_bytes=cut)
    whole = pacsv.read_csv(
        path,
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in rows[0].split(",")}
        ),
    ).to_pandas()
    table = pd.concat(got, ignore_index=True)
    assert n == len(table) == len(whole) == 40
    pd.testing.assert_frame_equal(table, whole, check_exact=True)
    assert table["extra"].iloc[19] == "x\nb,u9,r,[0 0 1 1],hat,0.5,0,img9,y"


def test_a_bad_bbox_is_kept_and_flagged_by_default(small_dataset, tmp_path):
    csv = pd.read_csv(small_dataset.objects_csv, dtype=str)
    csv.loc[[3, 10], "bbox"] = ["[10, 20, 5", "not a box"]
    path = tmp_path / "objects.csv"
    csv.to_csv(path, index=False)
    base = config_for(replace(small_dataset, objects_csv=path), tmp_path / "keep",
                      train={"n_clusters": 5})  # fmt: skip
    result, catalog = ingest_only(base)
    assert result.n_rejected == 0  # clustered: the box is only for the report's crop
    objects = sinks.read_parquet(catalog.objects).set_index("source_row")
    assert sorted(objects.index[~objects["bbox_ok"]]) == [3, 10]
    assert objects["bbox_ok"].sum() == len(objects) - 2
    strict = base.model_copy(update={
        "ingest": base.ingest.model_copy(update={"on_bad_bbox": "reject"}),
        "output": base.output.model_copy(update={"dir": str(tmp_path / "reject")}),
    })  # fmt: skip
    result, catalog = ingest_only(strict)
    rejects = sinks.read_parquet(catalog.rejects)
    assert rejects["source_row"].tolist() == [3, 10] and set(rejects["reason"]) == {"bad_bbox"}


@pytest.mark.parametrize("block_bytes", [97, 1000, 1 << 23])
def test_streamed_validation_equals_the_whole_table_checks(tmp_path, block_bytes):
    """The ingest validates the CSV in blocks cut at line breaks; a repeated object must
    be found across blocks and everything must equal :func:`validate_rows` on the whole
    table (the oracle): the same rejects (reasons and details, in file order) and the
    same candidates. Blocks of 97 bytes hold about one row each."""
    from pipeline.config import SelectConfig
    from pipeline.ingest import read_and_validate, validate_rows

    rows = ["batch_folder,username,res_name,bbox,tag,score,idx,image_name,extra"]
    for i in range(40):
        rows.append(
            f'b,u{i % 7},r,"[0, 0, {i}, 5]",{"hat" if i % 5 else "cap"},{i / 40},{i % 3},img{i % 4},x{i}'
        )
    rows[12] = rows[3]  # a repeat of an earlier row, in another block
    rows[30] = rows[3].replace('"[0, 0, 2, 5]"', '"[1, 2]"')  # same key, bad bbox first
    rows[25] = "b,u1,r,[0 0 1 1],hat,nan,1,img1,y"  # bad score
    rows[33] = "b,,r,[0 0 1 1],hat,0.5,0,img9,z"  # missing username
    path = tmp_path / "objects.csv"
    path.write_text("\n".join(rows) + "\n")
    select = SelectConfig(exclude_tags=["cap"], min_score=0.1)

    candidates, rejects, n = read_and_validate(
        str(path), select, "reject", str(tmp_path / "staging.arrow"), block_bytes
    )
    raw = read_objects_csv(str(path))
    typed, reasons, details = validate_rows(raw, select, "reject")
    assert n == len(raw) == 40
    bad = reasons.to_numpy() != ""
    assert rejects["source_row"].tolist() == np.flatnonzero(bad).tolist()
    assert rejects["reason"].tolist() == reasons[bad].tolist()
    assert rejects["detail"].tolist() == details[bad].tolist()
    assert {"duplicate_object", "bad_bbox", "bad_score", "missing_key", "not_selected:tag",
            "not_selected:score"} <= set(rejects["reason"])  # fmt: skip
    expected = typed[~bad].reset_index(drop=True)
    assert candidates["source_row"].tolist() == np.flatnonzero(~bad).tolist()
    pd.testing.assert_frame_equal(
        candidates.drop(columns="source_row"), expected, check_dtype=False
    )


@pytest.mark.parametrize("rows_per_group", [7, 1 << 16])
def test_path_list_bytes_do_not_depend_on_batching(tmp_path, monkeypatch, rows_per_group):
    """The list of files read is the same file whether reads came in batches of 64 files
    (local) or of a task's files (workers)."""
    from pipeline.ingest import _PathList

    monkeypatch.setattr(_PathList, "ROWS", rows_per_group)
    paths = [f"root/user{i % 13}/img{i}.npy" for i in range(100)]
    written = {}
    for batch in (1, 5, 64, 100):
        url = str(tmp_path / f"paths-{batch}.parquet")
        with _PathList(url) as sink:
            for start in range(0, len(paths), batch):
                sink.extend(paths[start : start + batch])
        written[batch] = Path(url).read_bytes()
        assert pq.read_table(url)["path"].to_pylist() == paths
    assert len(set(written.values())) == 1
    assert pq.ParquetFile(str(tmp_path / "paths-1.parquet")).num_row_groups == -(
        -100 // rows_per_group
    )


@given(st.lists(st.tuples(st.sampled_from(["", "a", "é", "a b", "0"]),
                          st.sampled_from(["x", "", "x/y", "Ω"])), max_size=60))  # fmt: skip
@settings(max_examples=60, deadline=None)
def test_file_grouping_equals_pandas_groupby(rows):
    from pipeline.ingest.embeddings import group_codes

    frame = pd.DataFrame(rows, columns=["username", "image_name"], dtype="str")
    expected = frame.groupby(["username", "image_name"], sort=False).ngroup().to_numpy()
    np.testing.assert_array_equal(group_codes(frame, ["username", "image_name"]), expected)


# --------------------------------------------------------------------------- CSV partitions


def line_starts_oracle(data: bytes, size: int) -> list[int]:
    """The starts of the ranges by brute force: 0, then for each multiple of ``size`` the
    first line start at or after it (a line starts after every ``\\n``), deduplicated."""
    line_starts = [0] + [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    starts = {0}
    for at in range(size, len(data), size):
        later = [s for s in line_starts if s >= at and s < len(data)]
        if later:
            starts.add(later[0])
    return sorted(starts)


@given(
    lines=st.lists(st.text(alphabet="ab,\r", max_size=30), min_size=1, max_size=25),
    crlf=st.booleans(),
    final_newline=st.booleans(),
    size=st.integers(1, 70),
)
@settings(max_examples=200, deadline=None)
def test_csv_partitions_start_at_line_starts_and_cover_the_file(
    tmp_path_factory, lines, crlf, final_newline, size
):
    from pipeline.ingest.objects import csv_partitions

    end = "\r\n" if crlf else "\n"
    data = (end.join(lines) + (end if final_newline else "")).encode()
    if not data:
        return
    path = tmp_path_factory.mktemp("parts") / "objects.csv"
    path.write_bytes(data)
    ranges = csv_partitions(path, size)
    # Contiguous, non-empty, covering the file exactly, in order.
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
    assert all(a < b for a, b in ranges)
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
    # Each starts at a line start: the first one at or after a multiple of ``size``.
    assert all(a == 0 or data[a - 1 : a] == b"\n" for a, _ in ranges)
    assert [a for a, _ in ranges] == line_starts_oracle(data, size)
    # Cut there, the pieces are whole lines: they join back into the file's lines.
    pieces = [data[a:b] for a, b in ranges]
    assert all(p.endswith(b"\n") for p in pieces[:-1])
    assert b"".join(pieces).split(b"\n") == data.split(b"\n")


def test_csv_partitions_keep_a_long_line_whole(tmp_path):
    from pipeline.ingest.objects import csv_partitions

    path = tmp_path / "objects.csv"
    path.write_bytes(b"h\n" + b"x" * 1000 + b"\nab\ncd")  # no final newline
    assert csv_partitions(path, 1) == [(0, 2), (2, 1003), (1003, 1006), (1006, 1008)]
    assert csv_partitions(path, 10) == [(0, 1003), (1003, 1008)]  # 10 ... 1000: one line
    assert csv_partitions(path, 2000) == [(0, 1008)]
    path.write_bytes(b"h\r\n" + b"y" * 300 + b"\r\n1\r\n")
    assert csv_partitions(path, 100) == [(0, 305), (305, 308)]


def objects_csv_rows(n: int) -> list[str]:
    rows = ["batch_folder,username,res_name,bbox,tag,score,idx,image_name,extra"]
    for i in range(n):
        rows.append(
            f'b,u{i % 7},r,"[0, 0, {i}, 5]",{"hat" if i % 5 else "cap"},{i / n},{i % 3},img{i % 4},x{i}'
        )
    return rows


def validation_on_threads(path, select, tmp, monkeypatch, partition_bytes, block_bytes):
    """:func:`read_and_validate` with the workers' path on a threads executor (in this
    process), the file cut into ranges of ``partition_bytes``."""
    from pipeline.executor import Executor
    from pipeline.ingest import objects, read_and_validate

    monkeypatch.setattr(objects, "CSV_PARTITION_BYTES", partition_bytes)
    parts_dir = tmp / "parts"
    staging = tmp / "staging-workers.arrow"
    got = read_and_validate(str(path), select, "reject", str(staging), block_bytes,
                            workers=Executor(kind="threads", n_cores=2), parts_dir=str(parts_dir))  # fmt: skip
    return got, sorted(parts_dir.glob("part-*.arrow")), staging.exists()


@pytest.mark.parametrize(("partition_bytes", "block_bytes"), [(1, 97), (150, 97), (700, 300),
                                                              (5000, 97), (1 << 23, 1 << 23)])  # fmt: skip
def test_validation_on_workers_equals_the_client_read(
    tmp_path, monkeypatch, partition_bytes, block_bytes
):
    """The ranges checked as tasks, then merged (source rows offset, repeats found
    across ranges), give the client's read exactly: candidates and rejects, dtypes and
    order. Row 3 repeats in rows 12 and 38, in other ranges once the file is cut small."""
    from pipeline.config import SelectConfig
    from pipeline.ingest import read_and_validate
    from pipeline.ingest.objects import csv_partitions

    rows = objects_csv_rows(40)
    rows[13] = rows[4]  # data row 12 repeats data row 3
    rows[39] = rows[4]  # and so does the last row, in the last range
    rows[26] = "b,u1,r,[0 0 1 1],hat,nan,1,img1,y"  # bad score
    rows[34] = "b,,r,[0 0 1 1],hat,0.5,0,img9,z"  # missing username
    rows.insert(20, "")  # a blank line is no row, on either path
    path = tmp_path / "objects.csv"
    path.write_text("\n".join(rows) + "\n")
    select = SelectConfig(exclude_tags=["cap"], min_score=0.1)

    expected = read_and_validate(
        str(path), select, "reject", str(tmp_path / "staging.arrow"), block_bytes
    )
    got, parts, fell_back = validation_on_threads(
        path, select, tmp_path, monkeypatch, partition_bytes, block_bytes
    )
    assert not fell_back
    # A file per range with rows (size 1: every line; not the header's, nor the blank's).
    n_ranges = len(csv_partitions(path, partition_bytes))
    assert len(parts) == (40 if partition_bytes == 1 else n_ranges)
    assert len(parts) >= 3 or partition_bytes > path.stat().st_size
    assert got[2] == expected[2] == 40
    pd.testing.assert_frame_equal(got[0], expected[0], check_exact=True)
    pd.testing.assert_frame_equal(got[1], expected[1], check_exact=True)
    dup = got[1][got[1]["reason"] == "duplicate_object"]
    assert dup["source_row"].tolist() == [12, 38]
    assert all("repeats data row 3;" in d for d in dup["detail"])


@pytest.mark.parametrize("bad", ["quoted_line_break", "cut_inside_quotes", "malformed", "no_rows"])
def test_validation_on_workers_falls_back_to_the_client_read(tmp_path, monkeypatch, bad):
    """A range the fast parse refuses, or with a value holding a line break, sends the
    whole file to the client's read: the same results or the same one-line error. The
    cut inside a quoted value parses without error into one row too many (the rest of
    the value reads as a row): only the line-break check catches it."""
    from pipeline.config import SelectConfig
    from pipeline.errors import InputError
    from pipeline.ingest import read_and_validate

    rows = objects_csv_rows(40)
    partition_bytes = 150
    if bad in ("quoted_line_break", "cut_inside_quotes"):
        # The last field of data row 19 holds a line break and then what looks like a row.
        rows[20] = rows[20].replace(",x19", ',"x\nb,u9,r,[0 0 1 1],hat,0.5,0,img9,y"')
    elif bad == "malformed":
        rows[30] = rows[30] + ",one too many"
    else:
        rows = [rows[0], "", "", ""]
    path = tmp_path / "objects.csv"
    path.write_text("\n".join(rows) + "\n")
    if bad == "cut_inside_quotes":  # a range starts right after the quoted line break
        partition_bytes = path.read_bytes().index(b'"x\n') + 3
    select = SelectConfig()
    try:
        expected = read_and_validate(str(path), select, "reject", str(tmp_path / "l.arrow"))
    except InputError as exc:
        with pytest.raises(InputError) as err:
            validation_on_threads(path, select, tmp_path, monkeypatch, partition_bytes, 97)
        assert str(err.value) == str(exc)
        assert ("line 31 must have 9 fields" in str(exc)) if bad == "malformed" else (
            "has a header but no rows" in str(exc))  # fmt: skip
        return
    got, parts, fell_back = validation_on_threads(
        path, select, tmp_path, monkeypatch, partition_bytes, 97
    )
    assert fell_back and not parts  # the client's staging file, no range's file left
    assert expected[2] == got[2] == 40
    assert got[0]["extra"].tolist()[19] == "x\nb,u9,r,[0 0 1 1],hat,0.5,0,img9,y"
    pd.testing.assert_frame_equal(got[0], expected[0], check_exact=True)
    pd.testing.assert_frame_equal(got[1], expected[1], check_exact=True)
