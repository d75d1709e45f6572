"""``pipeline/store.py``: the Zarr layout, chunked reads and the path helpers, on real
files under ``tmp_path``; numpy slicing and fancy indexing are the oracles."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import store
from pipeline.errors import MissingInputError, OutputError

N, DIM, CHUNK = 1000, 12, 128  # 8 chunks, the last one ragged (104 rows)


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A store whose rows are known: row i of the store is ``x[i]``."""
    x = np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)
    url = str(tmp_path_factory.mktemp("store") / "embeddings.zarr")
    group = store.create_store(url, N, DIM, CHUNK, attrs={"n_rows": N})
    group[store.VECTORS][:] = x
    group[store.OBJECT_IDS][:] = np.arange(N) * 3
    return url, x


def test_create_and_open_store_layout(tmp_path):
    url = str(tmp_path / "e.zarr")
    store.create_store(url, 10, 4, 3, attrs={"n_rows": 10, "dim": 4})
    group = store.open_store(url)
    assert dict(group.attrs) == {"n_rows": 10, "dim": 4}
    vectors, ids = group[store.VECTORS], group[store.OBJECT_IDS]
    assert vectors.shape == (10, 4) and vectors.chunks == (3, 4)
    assert vectors.dtype == np.float32 and ids.dtype == np.int64
    assert ids.shape == (10,) and ids.chunks == (3,)
    assert vectors.metadata.zarr_format == 3
    # Fill values: zero vectors, object id -1 (nothing written yet).
    np.testing.assert_array_equal(vectors[:], np.zeros((10, 4), np.float32))
    np.testing.assert_array_equal(ids[:], np.full(10, -1))
    # Chunks never exceed the rows; the read-only group refuses writes.
    assert store.create_store(str(tmp_path / "small.zarr"), 5, 4, 8192)[store.VECTORS].chunks == (
        5,
        4,
    )
    with pytest.raises(Exception):  # noqa: B017 - zarr's read-only error type varies
        group[store.VECTORS][0] = 1.0


def test_create_store_overwrites(tmp_path):
    url = str(tmp_path / "e.zarr")
    store.create_store(url, 10, 4, 3)[store.VECTORS][:] = 7.0
    store.create_store(url, 6, 2, 3)
    assert store.open_store(url)[store.VECTORS].shape == (6, 2)


def test_open_missing_store_says_run_ingest(tmp_path):
    with pytest.raises(MissingInputError, match="Run the 'ingest' stage first"):
        store.open_store(str(tmp_path / "nope.zarr"))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_read_rows_equals_numpy_slicing(filled, data):
    url, x = filled
    start = data.draw(st.integers(0, N))
    stop = data.draw(st.integers(start, N))
    np.testing.assert_array_equal(store.read_rows(url, start, stop), x[start:stop])


@pytest.mark.parametrize(
    ("start", "stop"),
    [(0, N), (0, 128), (127, 129), (100, 300), (896, 1000), (900, 1000), (999, 1000), (5, 5)],
)
def test_read_rows_boundaries(filled, start, stop):
    url, x = filled
    got = store.read_rows(url, start, stop)
    assert got.dtype == np.float32 and got.shape == (stop - start, DIM)
    np.testing.assert_array_equal(got, x[start:stop])


def test_read_rows_into_out(filled):
    url, x = filled
    out = np.full((300, DIM), np.nan, dtype=np.float32)
    result = store.read_rows(url, 100, 400, out=out)
    assert result is out
    np.testing.assert_array_equal(out, x[100:400])


def test_vectors_array_is_one_block_per_chunk(filled):
    url, x = filled
    array = store.vectors_array(url)
    assert array.chunks[0] == (128,) * 7 + (104,)
    np.testing.assert_array_equal(array.compute(scheduler="synchronous"), x)


def test_read_rows_reusing_buffer_reuses_this_threads_buffer(filled):
    url, x = filled
    first = store.read_rows_reusing_buffer(url, 0, 200)
    np.testing.assert_array_equal(first, x[:200])
    first_copy = first.copy()
    second = store.read_rows_reusing_buffer(url, 500, 650)
    np.testing.assert_array_equal(second, x[500:650])
    assert np.shares_memory(first, second)  # documented: valid only until the next call
    assert not np.array_equal(first[:150], first_copy[:150])


def test_thread_buffer_reuse_rules():
    a = store.thread_buffer("test-a", 100, 8)
    assert a.shape == (100, 8) and a.dtype == np.float32
    assert np.shares_memory(store.thread_buffer("test-a", 50, 8), a)  # fewer rows: reused
    assert store.thread_buffer("test-a", 50, 8).shape == (50, 8)
    bigger = store.thread_buffer("test-a", 200, 8)  # more rows: a new, larger buffer
    assert not np.shares_memory(bigger, a)
    assert np.shares_memory(store.thread_buffer("test-a", 100, 8), bigger)
    assert not np.shares_memory(store.thread_buffer("test-a", 10, 9), bigger)  # another dim
    assert not np.shares_memory(store.thread_buffer("test-b", 10, 9), bigger)  # another name
    mine = store.thread_buffer("test-c", 10, 4)
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(store.thread_buffer("test-c", 10, 4)))
    t.start()
    t.join()
    assert not np.shares_memory(mine, theirs[0])  # one per thread


# ----------------------------------------------------------------------------- mirror


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
def test_mirror_to_store_writes_rows_in_store_ids_order(tmp_path, compression):
    n_memmap, dim, chunk = 700, 10, 64
    memmap = np.memmap(tmp_path / "m.f32", dtype=np.float32, mode="w+", shape=(n_memmap, dim))
    memmap[:] = np.random.default_rng(1).standard_normal((n_memmap, dim))
    memmap.flush()
    # Like ingest: a shuffled subset of the memmap's rows (rejected rows are left out).
    rng = np.random.default_rng(2)
    ids = rng.permutation(rng.choice(n_memmap, size=650, replace=False))
    url = str(tmp_path / "out" / "embeddings.zarr")
    store.mirror_to_store(memmap, ids, url, chunk, compression, {"k": compression}, False)

    group = store.open_store(url)
    vectors = group[store.VECTORS]
    assert vectors.shape == (650, dim) and vectors.chunks == (chunk, dim)
    np.testing.assert_array_equal(vectors[:], np.asarray(memmap)[ids])
    np.testing.assert_array_equal(group[store.OBJECT_IDS][:], ids)
    assert group.attrs["k"] == compression
    codecs = [type(c).__name__ for c in vectors.compressors]
    assert codecs == {"none": [], "lz4": ["BloscCodec"], "zstd": ["ZstdCodec"]}[compression]
    if compression == "lz4":
        assert vectors.compressors[0].cname.value == "lz4"
    # Only the store itself is left beside it: no temporary siblings.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["embeddings.zarr"]


def test_mirror_to_store_replaces_an_older_store(tmp_path):
    memmap = np.arange(40, dtype=np.float32).reshape(10, 4)
    url = str(tmp_path / "e.zarr")
    store.create_store(url, 99, 4, 10)
    store.mirror_to_store(memmap, np.array([3, 1, 2]), url, 2, "none", {}, False)
    np.testing.assert_array_equal(zarr.open_array(url, path="vectors")[:], memmap[[3, 1, 2]])


# ----------------------------------------------------------------------------- paths


def test_location_helpers(tmp_path):
    assert store.parse_location(f"file://{tmp_path}/x") == f"{tmp_path}/x"
    assert store.parse_location(str(tmp_path / "x")) == str(tmp_path / "x")
    assert store.parse_location("memory://bucket/x") == "memory://bucket/x"
    assert store.is_local(str(tmp_path)) and store.is_local(f"file://{tmp_path}")
    assert not store.is_local("memory://bucket/x")
    assert store.join("s3://b/out/", "model", "centers.npy") == "s3://b/out/model/centers.npy"
    assert store.join("/a/b", "c") == "/a/b/c"


class Boom(Exception):
    pass


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_atomic_path_leaves_nothing_when_the_block_raises(tmp_path, kind):
    target = tmp_path / "out" / "thing"
    with pytest.raises(Boom):
        with store.atomic_path(str(target)) as tmp:
            if kind == "file":
                open(tmp, "w").write("half")
            else:
                (tmp_path / "out" / tmp.rsplit("/", 1)[-1]).mkdir()
                open(f"{tmp}/part", "w").write("half")
            raise Boom
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []  # the temporary is gone too


def test_atomic_path_keeps_the_old_output_when_the_block_raises(tmp_path):
    target = tmp_path / "summary.md"
    target.write_text("old")
    with pytest.raises(Boom):
        with store.atomic_path(str(target)) as tmp:
            open(tmp, "w").write("new")
            raise Boom
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]


def test_atomic_path_moves_into_place_on_success(tmp_path):
    target = tmp_path / "dir"
    target.mkdir()
    (target / "stale").write_text("x")
    with store.atomic_path(str(target)) as tmp:
        assert ".tmp-" in tmp and not tmp.startswith(str(target) + "/")
        (tmp_path / tmp.rsplit("/", 1)[-1]).mkdir()
        open(f"{tmp}/fresh", "w").write("y")
        assert not (target / "fresh").exists()  # nothing visible before the block ends
    assert sorted(p.name for p in target.iterdir()) == ["fresh"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["dir"]


def test_atomic_path_under_a_file_is_an_output_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="cannot be created"):
        with store.atomic_path(str(tmp_path / "f" / "sub" / "out.json")):
            pass


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / "model.tmp-1a2b3c4d").mkdir()
    (tmp_path / "model.tmp-1a2b3c4d" / "centers.npy").write_bytes(b"x")
    (tmp_path / "summary.md.tmp-deadbeef").write_text("half")
    (tmp_path / ".tmp-probe-00000000").write_text("")
    (tmp_path / "summary.md").write_text("done")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "x.tmp-11111111").write_text("nested: not touched")
    (tmp_path / "notes.tmp-12345678").write_text("the user's: not ours, kept")
    (tmp_path / "embeddings-20260101T000000-abcdef.f32").write_text("a killed run's staging")
    store.remove_stale_temporaries(str(tmp_path), ("model", "summary.md"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "embeddings-20260101T000000-abcdef.f32", "model", "notes.tmp-12345678", "summary.md"
    ]  # fmt: skip
    store.remove_stale_temporaries(str(tmp_path), ("embeddings",), suffix=".f32")
    assert not (tmp_path / "embeddings-20260101T000000-abcdef.f32").exists()
    assert (tmp_path / "model" / "x.tmp-11111111").exists()
    store.remove_stale_temporaries(str(tmp_path / "missing"), ("model",))  # no folder


def test_temporaries_carry_the_run_id_and_are_removed_as_ours(tmp_path):
    run_id = "20260101T000000-abcdef"
    with store.run_scope(run_id), store.atomic_path(str(tmp_path / "model")) as tmp:
        assert Path(tmp).name.startswith(f"model.tmp-{run_id}-")
        Path(tmp).mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (tmp_path / f"model.tmp-{run_id}-1a2b3c4d").mkdir()  # as a killed run leaves it
    (tmp_path / f"notes.tmp-{run_id}-1a2b3c4d").mkdir()  # not one of our names
    store.remove_stale_temporaries(str(tmp_path), ("model",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", f"notes.tmp-{run_id}-1a2b3c4d"]


def test_check_writable(tmp_path):
    folder = tmp_path / "a" / "b"
    store.check_writable(str(folder), "output.dir")
    assert folder.is_dir() and list(folder.iterdir()) == []  # probe removed
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"output.dir must be a writable folder") as info:
        store.check_writable(str(tmp_path / "file" / "out"), "output.dir")
    assert isinstance(info.value, OSError)
    assert len(str(info.value).splitlines()) == 1
