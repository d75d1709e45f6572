from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import config_for
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import postprocess, schema, sinks, summarize
from pipeline.config import PostprocessConfig
from pipeline.postprocess import label_rows
from pipeline.runner import run

K, DUP, LOW, SMALL = (
    schema.STATUS_KEPT,
    schema.STATUS_DUPLICATE,
    schema.STATUS_LOW_SIMILARITY,
    schema.STATUS_SMALL_CLUSTER,
)


def hand_table() -> pd.DataFrame:
    """Cluster 0: 4 rows, image 'a' twice (0.9 beats 0.8), 0.70 is not above 0.7 -> 2 left.
    Cluster 1: 3 good rows. Cluster 2: 2 good rows. Cluster 3: only low rows, removed
    entirely by the similarity filter (the write-up's cluster 202)."""
    rows = [
        # object_id, cluster, image_name, sim
        (0, 0, "a", 0.80), (1, 0, "a", 0.90), (2, 0, "b", 0.75), (3, 0, "c", 0.70),
        (4, 1, "d", 0.95), (5, 1, "e", 0.85), (6, 1, "a", 0.71),
        (7, 2, "f", 0.99), (8, 2, "g", 0.98),
        (9, 3, "h", 0.50), (10, 3, "i", 0.10),
    ]  # fmt: skip
    t = pd.DataFrame(rows, columns=["object_id", "cluster", "image_name", "sim"])
    t["dist"] = 1 - t["sim"]
    t["tag"] = "shoe"
    return t


# With min_cluster_size 3 only cluster 1 is large enough.
EXPECTED = {
    0: DUP,
    1: SMALL,
    2: SMALL,
    3: LOW,
    4: K,
    5: K,
    6: K,
    7: SMALL,
    8: SMALL,
    9: LOW,
    10: LOW,
}


def test_label_rows_on_hand_built_table():
    out3 = label_rows(hand_table(), "image_name", 0.7, 3)
    assert dict(zip(out3["object_id"], out3["status"], strict=False)) == EXPECTED
    # min size 2 keeps clusters 0 and 2 as well
    out2 = label_rows(hand_table(), "image_name", 0.7, 2)
    assert dict(zip(out2["object_id"], out2["status"], strict=False)) == {
        **EXPECTED,
        1: K,
        2: K,
        7: K,
        8: K,
    }
    # output is sorted by cluster, then descending similarity
    assert out2["object_id"].tolist() == [1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10]


def test_funnel_of_hand_built_table():
    labelled = label_rows(hand_table(), "image_name", 0.7, 3)
    f = summarize.funnel(11, {}, labelled)
    assert f["rows"].tolist() == [11, 11, 11, 11, 10, 7, 3]
    assert f["clusters"].tolist()[3:] == [4, 4, 3, 1]
    assert f["removed"].tolist() == [0, 0, 0, 0, 1, 3, 4]
    assert summarize.is_accounted(f)


def test_similarity_threshold_is_strict():
    # The write-up keeps similarity *greater than* 0.7: exactly 0.7 is removed.
    out = label_rows(hand_table(), "image_name", 0.7, 1)
    assert out.set_index("object_id").loc[3, "status"] == LOW


def test_no_dedupe_key_keeps_same_image_rows():
    out = label_rows(hand_table(), None, 0.7, 1)
    assert out.set_index("object_id").loc[0, "status"] == K


@pytest.mark.parametrize(
    "dedupe_key, min_similarity, min_cluster_size",
    [("image_name", 0.7, 10), (None, 0.6, 4), ("image_name", 0.8, 15)],
)
def test_labelling_by_cluster_block_equals_the_whole_table(
    dedupe_key, min_similarity, min_cluster_size, tmp_path
):
    # Non-default settings too: a stage that dropped a setting and fell back to
    # label_rows' defaults would pass with the defaults alone (a mutant that did survived).
    rng = np.random.default_rng(0)
    n = 3000
    t = pd.DataFrame(
        {
            "object_id": np.arange(n),
            "cluster": rng.integers(0, 40, n).astype("int32"),
            "image_name": rng.integers(0, 600, n).astype(str),
            "sim": rng.uniform(0.4, 1.0, n).astype("float32"),
            "dist": rng.uniform(0, 1, n).astype("float32"),
            "tag": "x",
        }
    )
    cfg = PostprocessConfig(
        dedupe_key=dedupe_key, min_similarity=min_similarity, min_cluster_size=min_cluster_size
    )
    expected = label_rows(t, dedupe_key, min_similarity, min_cluster_size)
    expected = expected.set_index("object_id")["status"]
    default = label_rows(t).set_index("object_id")["status"]
    if cfg != PostprocessConfig():  # the settings matter on this table
        assert not expected.sort_index().equals(default.sort_index())
    # The stage's path: parts split by cluster block, each block labelled on its own.
    parts = np.array_split(np.arange(n), 7)
    part_urls = []
    for i, rows in enumerate(parts):
        part_urls.append(str(tmp_path / f"part-{i}.parquet"))
        t.iloc[rows].to_parquet(part_urls[-1], index=False)
    sizes = pd.concat([postprocess.part_cluster_sizes(u) for u in part_urls]).groupby(level=0).sum()
    starts = postprocess.cluster_blocks(sizes, 400)
    assert len(starts) > 3  # several blocks, each of whole clusters
    splits = [str(tmp_path / f"split-{i}.arrow") for i in range(len(parts))]
    for i, (url, rows) in enumerate(zip(part_urls, parts, strict=True)):
        postprocess.split_by_block(url, int(rows[0]), starts, splits[i])
    codes_urls = [str(tmp_path / f"codes-{b}.bin") for b in range(len(starts))]
    for b, url in enumerate(codes_urls):
        postprocess.label_block(cfg, splits, b, url)
    codes = postprocess.load_status_codes(codes_urls, n - 1)
    got = pd.Series(np.array(schema.STATUS_ORDER)[codes], index=np.arange(n))
    pd.testing.assert_series_equal(
        got.sort_index(), expected.sort_index(), check_dtype=False, check_names=False,
        check_index_type=False,
    )  # fmt: skip


tables = st.lists(
    st.tuples(st.integers(0, 5), st.sampled_from("abcdefg"), st.floats(-1, 1, width=32)),
    min_size=0,
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(rows=tables, min_sim=st.floats(-0.5, 0.9), min_size=st.integers(1, 6))
def test_postprocessing_properties(rows, min_sim, min_size):
    t = pd.DataFrame(rows, columns=["cluster", "image_name", "sim"])
    t.insert(0, "object_id", np.arange(len(t)))
    out = label_rows(t, "image_name", min_sim, min_size)
    kept = out[out["status"] == K]
    # every input row is labelled exactly once, and output rows are a subset of the input
    assert sorted(out["object_id"]) == list(range(len(t)))
    assert set(out["status"]) <= set(schema.STATUS_ORDER)
    # no cluster holds one image twice; every kept sim exceeds the threshold
    assert not kept.duplicated(["cluster", "image_name"]).any()
    assert (kept["sim"] > min_sim).all()
    # every kept cluster has at least min_size rows
    assert (kept.groupby("cluster").size() >= min_size).all()
    # idempotent: post-processing the kept rows changes nothing
    again = label_rows(kept.drop(columns="status"), "image_name", min_sim, min_size)
    assert (again["status"] == K).all()
    # the kept row of an (cluster, image) is the most similar of that pair
    best = t.groupby(["cluster", "image_name"])["sim"].max()
    for row in kept.itertuples():
        assert row.sim == best[(row.cluster, row.image_name)]
    # complete: exactly the rows an independent pandas reading of the three rules keeps
    first = t.sort_values(["sim", "object_id"], ascending=[False, True]).drop_duplicates(
        ["cluster", "image_name"]
    )
    similar = first[first["sim"] > min_sim]
    expected = similar[similar.groupby("cluster")["object_id"].transform("size") >= min_size]
    assert sorted(kept["object_id"]) == sorted(expected["object_id"])
    # and each removed row carries the step that removed it
    status = out.set_index("object_id")["status"]
    assert (status[sorted(set(t["object_id"]) - set(first["object_id"]))] == DUP).all()
    low = first[first["sim"] <= min_sim]["object_id"]
    assert (status[sorted(low)] == LOW).all()


# ----------------------------------------------------------------------------- streaming


def generated_labelled(n: int = 6000, seed: int = 0) -> pd.DataFrame:
    """A labelled table in no particular order: cluster ids with gaps, float32 cosines,
    missing tags and users, every status."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(500, 70, replace=False)).astype(np.int32)
    t = pd.DataFrame(
        {
            "object_id": rng.permutation(n).astype(np.int64),
            "cluster": ids[np.minimum(rng.geometric(0.05, n), 69)],
            "image_name": rng.integers(0, 2000, n).astype(str),
            "sim": rng.uniform(0.3, 1.0, n).astype("float32"),
            "dist": rng.uniform(0, 1.5, n).astype("float32"),
            "tag": pd.Series(rng.choice(["shoe", "bag", "hat", None], n), dtype="str"),
            "username": pd.Series(rng.choice(["u1", "u2", "u3", None], n), dtype="str"),
        }
    )
    labelled = label_rows(t, "image_name", 0.7, 25)
    return labelled.sample(frac=1.0, random_state=seed).reset_index(drop=True), ids


def test_cluster_blocks_cover_every_cluster_once_in_order():
    sizes = pd.Series([5, 5, 20, 1, 1, 3], index=[9, 0, 2, 7, 11, 1])
    starts = postprocess.cluster_blocks(sizes, 10)
    assert starts.tolist() == [0, 2, 7]
    block = np.searchsorted(starts, sizes.index.to_numpy(), side="right") - 1
    assert block.tolist() == [2, 0, 1, 2, 2, 0]
    assert postprocess.cluster_blocks(pd.Series([], dtype="int64"), 10).tolist() == []


@pytest.mark.parametrize("order", ["shuffled", "by cluster"])
def test_streamed_summary_and_funnel_equal_the_in_memory_ones(order):
    # Shuffled (as the post-processed table is) or ascending by cluster (where pandas takes
    # its float64 fast path for the means): the same summary to the last bit either way.
    labelled, ids = generated_labelled()
    if order == "by cluster":
        labelled = labelled.sort_values("cluster", kind="stable").reset_index(drop=True)
    centres = np.random.default_rng(1).normal(size=(len(ids), 8)).astype(np.float32)
    expected = summarize.cluster_summary(labelled, centres, ids)
    assert set(labelled["status"]) == set(schema.STATUS_ORDER)
    kept = (labelled["status"] == K).to_numpy()
    clusters = labelled["cluster"].to_numpy()
    unsorted = (not summarize.is_ascending(clusters), not summarize.is_ascending(clusters[kept]))
    assert unsorted == ((True, True) if order == "shuffled" else (False, False))
    for target in (1, 300, 10**9):  # a block per cluster, ~300 rows, one block
        starts = postprocess.cluster_blocks(labelled.groupby("cluster").size(), target)
        block = np.searchsorted(starts, clusters, side="right") - 1
        stats = pd.concat(
            [summarize.cluster_stats(labelled[block == b], *unsorted) for b in range(len(starts))]
        )
        got = summarize.summary_from_stats(stats, centres, ids)
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
        pd.testing.assert_frame_equal(
            summarize.funnel_from_stats(9000, {"missing_key": 3}, stats),
            summarize.funnel(9000, {"missing_key": 3}, labelled),
        )


def test_status_codes_through_the_staging_files(tmp_path):
    labelled, _ = generated_labelled(500)
    codes = labelled["status"].map({s: i for i, s in enumerate(schema.STATUS_ORDER)})
    urls, max_ids = [], []
    for i, part in enumerate(np.array_split(np.arange(len(labelled)), 3)):
        urls.append(str(tmp_path / f"codes-{i}.bin"))
        ids = labelled["object_id"].to_numpy()[part]
        max_ids.append(postprocess.write_status_codes(ids, codes.to_numpy()[part], urls[-1]))
    got = postprocess.load_status_codes(urls, max(max_ids))
    expected = np.full(int(labelled["object_id"].max()) + 1, -1, dtype=np.int8)
    expected[labelled["object_id"].to_numpy()] = codes.to_numpy()
    np.testing.assert_array_equal(got, expected)
    assert postprocess.write_status_codes(np.zeros(0), np.zeros(0), str(tmp_path / "e")) == -1


def in_memory_outputs(catalog, centres, cluster_ids, out: Path) -> dict[str, Path]:
    """The outputs as post-processing wrote them before it streamed: every kept row read
    and sorted at once, every row's summary columns read at once."""
    metadata = sinks.read_run_metadata(catalog.clusters_parquet)
    table_schema = pq.read_schema(sinks.part_urls(catalog.postprocessed)[0])
    extra = table_schema.names[len(schema.ASSIGNMENTS_SCHEMA) :]
    kept = sinks.read_parquet(
        catalog.postprocessed, filters=[(schema.STATUS, "==", schema.STATUS_KEPT)]
    )
    kept = kept.sort_values(["cluster", "sim", schema.OBJECT_ID], ascending=[True, False, True])
    paths = {name: out / name for name in ("clusters.csv", "clusters.parquet", "summary.parquet")}
    sinks.write_csv(kept, str(paths["clusters.csv"]), schema.OUTPUT_CSV_FIELDS,
                    schema.CLUSTERS_SCHEMA)  # fmt: skip
    sinks.write_parquet(
        kept[[*schema.CLUSTERS_SCHEMA.names, schema.OBJECT_ID, schema.SOURCE_ROW, *extra]],
        str(paths["clusters.parquet"]), schema.CLUSTERS_SCHEMA, metadata,
    )  # fmt: skip
    table = sinks.read_parquet(catalog.postprocessed, columns=list(summarize.SUMMARY_COLUMNS))
    summary = summarize.cluster_summary(table, centres, cluster_ids)
    sinks.write_parquet(summary, str(paths["summary.parquet"]), schema.CLUSTER_SUMMARY_SCHEMA,
                        metadata)  # fmt: skip
    return paths


@pytest.mark.parametrize("scheduler", ["threads", "synchronous"])
def test_stage_outputs_equal_the_in_memory_sort_byte_for_byte(small_dataset, tmp_path, scheduler):
    # ingest.chunk_rows 64: ~31 assignment parts and ~31 cluster blocks of 20 clusters.
    cfg = config_for(small_dataset, tmp_path / "out", ingest={"chunk_rows": 64},
                     executor={"scheduler": scheduler})  # fmt: skip
    result = run(cfg)
    cat = result.catalog
    assert len(sinks.part_urls(cat.postprocessed)) > 10
    paths = in_memory_outputs(cat, cat.read_centres(), cat.read_cluster_ids(), tmp_path)
    assert Path(cat.clusters_csv).read_bytes() == paths["clusters.csv"].read_bytes()
    assert Path(cat.clusters_parquet).read_bytes() == paths["clusters.parquet"].read_bytes()
    assert Path(cat.cluster_summary).read_bytes() == paths["summary.parquet"].read_bytes()
    table = sinks.read_parquet(cat.postprocessed, columns=list(summarize.SUMMARY_COLUMNS))
    info = cat.read_ingest_summary()
    expected = summarize.funnel(info["n_input_rows"], info["rejected"], table)
    pd.testing.assert_frame_equal(sinks.read_parquet(cat.funnel), expected, check_dtype=False)
    # The stage's staging files are gone.
    staging = Path(cat.staging)
    assert not staging.exists() or not list(staging.glob("postprocess-*"))


def test_whole_table_order_from_the_blocks_order_infos():
    # Block 0 holds clusters 0-1, block 1 clusters 2-3; positions are table rows.
    info = postprocess._order_info
    ascending = [
        info(np.array([0, 1, 2]), np.array([0, 0, 1])),
        info(np.array([3, 5]), np.array([2, 3])),
    ]
    assert postprocess._ascending(ascending)
    assert postprocess._ascending([info(np.array([]), np.array([])), *ascending])
    # a block's rows out of order, or a later block's row before an earlier block's
    assert not postprocess._ascending([info(np.array([0, 1]), np.array([1, 0]))])
    interleaved = [
        info(np.array([0, 4]), np.array([0, 1])),
        info(np.array([2, 5]), np.array([2, 3])),
    ]
    assert not postprocess._ascending(interleaved)


def test_a_failed_stage_leaves_no_staging_files(small_dataset, tmp_path, monkeypatch):
    cfg = config_for(small_dataset, tmp_path / "out")
    result = run(cfg, stages=("ingest", "train", "predict"))

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(postprocess, "render_block", broken)
    with pytest.raises(Exception, match="render failed"):
        run(cfg, stages=("postprocess",))
    staging = Path(result.catalog.staging)
    assert not staging.exists() or not list(staging.glob("postprocess-*"))


# ----------------------------------------------------------------------------- mutation survivors
# Each test below killed a hand mutant that the tests above let through.


def test_block_order_infos_tell_whether_the_table_and_its_kept_rows_ascend(tmp_path):
    """The order infos that :func:`label_block` returns say, through :func:`_ascending`,
    whether the whole table's clusters ascend and whether its kept rows' do (the table
    positions span parts: each part's rows start at its offset). Checked against numpy on
    the table itself, for a table in cluster order (a part per cluster) and for one whose
    kept rows ascend while its removed rows do not."""
    cfg = PostprocessConfig(dedupe_key=None, min_similarity=0.7, min_cluster_size=1)

    def infos(t: pd.DataFrame, parts: list[np.ndarray]):
        urls = [str(tmp_path / f"p{len(t)}-{i}.parquet") for i in range(len(parts))]
        for url, rows in zip(urls, parts, strict=True):
            t.iloc[rows].to_parquet(url, index=False)
        sizes = t.groupby("cluster").size()
        starts = postprocess.cluster_blocks(sizes, int(sizes.max()))
        assert len(starts) == len(sizes)  # a block per cluster
        splits = [url + ".arrow" for url in urls]
        for url, split, rows in zip(urls, splits, parts, strict=True):
            postprocess.split_by_block(url, int(rows[0]), starts, split)
        orders = [
            postprocess.label_block(cfg, splits, b, str(tmp_path / f"c{len(t)}-{b}"))["orders"]
            for b in range(len(starts))
        ]
        return postprocess._ascending([o[0] for o in orders]), postprocess._ascending(
            [o[1] for o in orders]
        )

    def ascends(clusters) -> bool:
        return bool((np.diff(np.asarray(clusters)) >= 0).all())

    # 1. In cluster order, a part per cluster (so each block is one part).
    n = 4 * 50
    t = pd.DataFrame(
        {
            "object_id": np.arange(n),
            "cluster": np.repeat(np.arange(4), 50).astype("int32"),
            "sim": np.tile(np.linspace(0.5, 1.0, 50), 4).astype("float32"),
        }  # fmt: skip
    )
    assert infos(t, np.array_split(np.arange(n), 4)) == (True, True)
    # 2. Kept rows (sim > 0.7) in cluster order, a removed row of cluster 1 before one
    # of cluster 0: the table does not ascend, its kept rows do.
    clusters = [0] * 20 + [1] + [1] * 20 + [0]
    sims = [0.9] * 20 + [0.1] + [0.9] * 20 + [0.1]
    t = pd.DataFrame(
        {
            "object_id": np.arange(42),
            "cluster": np.array(clusters, "int32"),
            "sim": np.array(sims, "float32"),
        }  # fmt: skip
    )
    kept = t["sim"] > 0.7
    expected = (ascends(t["cluster"]), ascends(t.loc[kept, "cluster"]))
    assert expected == (False, True)
    assert infos(t, np.array_split(np.arange(42), 3)) == expected


def rewrite_assignments(catalog, order: np.ndarray, parts: list[np.ndarray]) -> None:
    """Rewrite the assignments table with its rows in ``order``, cut into ``parts``
    (positions into ``order``), keeping its schema and metadata."""
    import pyarrow as pa

    urls = sinks.part_urls(catalog.assignments)
    table = pa.concat_tables([pq.read_table(u) for u in urls]).take(pa.array(order))
    for url in urls:
        Path(url).unlink()
    for i, rows in enumerate(parts):
        pq.write_table(table.take(pa.array(rows)), f"{catalog.assignments}/part-{i:05d}.parquet")


def postprocess_stage_alone(cfg) -> None:
    """Stage 4 on the output folder as it is (no runner: the assignments were rewritten)."""
    from pipeline import store
    from pipeline.catalog import run_metadata
    from pipeline.context import StageContext
    from pipeline.executor import open_executor
    from pipeline.plan import plan_run

    plan = plan_run(cfg, ("postprocess",))
    with store.run_scope(plan.run_id), open_executor(cfg.executor, plan.workers) as ex:
        context = StageContext(plan=plan, executor=ex, metadata=run_metadata(cfg))
        postprocess.postprocess_stage(context, cfg.postprocess)


@pytest.fixture(scope="module")
def postprocessed_run(small_dataset, tmp_path_factory):
    """A run through post-processing (clusters of < 60 rows removed), copied by each user."""
    cfg = config_for(small_dataset, tmp_path_factory.mktemp("pp") / "out",
                     postprocess={"min_cluster_size": 60})  # fmt: skip
    run(cfg, ("ingest", "train", "predict", "postprocess"))
    return cfg


@pytest.mark.parametrize("order", ["by cluster", "kept rows by cluster"])
def test_stage_outputs_equal_the_in_memory_ones_whatever_the_assignments_order(
    postprocessed_run, tmp_path, order
):
    """The summary's means equal pandas' on the whole table to the last bit only when the
    stage knows whether the table (and its kept rows) ascend by cluster; predict's table
    never does, so here the assignments are rewritten in cluster order (a part per
    cluster, of unequal sizes), or with only the kept rows in cluster order."""
    import shutil

    from pipeline.catalog import Catalog

    shutil.copytree(postprocessed_run.output.dir, tmp_path / "out")
    output = postprocessed_run.output.model_copy(update={"dir": str(tmp_path / "out")})
    cfg = postprocessed_run.model_copy(update={"output": output})
    cat = Catalog.from_config(cfg.output)
    labelled = sinks.read_parquet(cat.postprocessed, columns=["cluster", "status"])
    clusters = labelled["cluster"].to_numpy()
    if order == "by cluster":
        rows = np.argsort(clusters, kind="stable")
        bounds = np.flatnonzero(np.diff(clusters[rows])) + 1
        parts = np.split(np.arange(len(rows)), bounds)
        assert len({len(p) for p in parts}) > 1  # parts of unequal sizes
    else:
        kept = np.flatnonzero(labelled["status"].to_numpy() == K)
        removed = np.flatnonzero(labelled["status"].to_numpy() != K)
        rows = np.concatenate([kept[np.argsort(clusters[kept], kind="stable")], removed])
        assert len(np.unique(clusters[kept])) > 1 and not summarize.is_ascending(clusters[rows])
        parts = np.array_split(np.arange(len(rows)), 8)
    rewrite_assignments(cat, rows, parts)
    postprocess_stage_alone(cfg)
    paths = in_memory_outputs(cat, cat.read_centres(), cat.read_cluster_ids(), tmp_path)
    assert Path(cat.cluster_summary).read_bytes() == paths["summary.parquet"].read_bytes()
    assert Path(cat.clusters_csv).read_bytes() == paths["clusters.csv"].read_bytes()


@pytest.mark.parametrize("min_cluster_size", [5, 12])
def test_the_stage_path_keeps_clusters_by_the_configured_size(tmp_path, min_cluster_size):
    """Clusters of 3, 5, 9, 12 and 20 rows, every row similar and its own image: a
    cluster is kept whole when it has at least ``min_cluster_size`` rows (by hand), by the
    per-block labelling the stage runs."""
    sizes = [3, 5, 9, 12, 20]
    clusters = np.repeat(np.arange(len(sizes)), sizes).astype("int32")
    n = len(clusters)
    t = pd.DataFrame(
        {
            "object_id": np.arange(n),
            "cluster": clusters,
            "sim": np.full(n, 0.9, "float32"),
            "image_name": np.arange(n).astype(str),
        }  # fmt: skip
    )
    url = str(tmp_path / "part.parquet")
    t.to_parquet(url, index=False)
    starts = postprocess.cluster_blocks(postprocess.part_cluster_sizes(url), 25)
    split = str(tmp_path / "split.arrow")
    postprocess.split_by_block(url, 0, starts, split)
    cfg = PostprocessConfig(min_cluster_size=min_cluster_size)
    codes_urls = [str(tmp_path / f"codes-{b}") for b in range(len(starts))]
    for b, codes_url in enumerate(codes_urls):
        postprocess.label_block(cfg, [split], b, codes_url)
    got = np.array(schema.STATUS_ORDER)[postprocess.load_status_codes(codes_urls, n - 1)]
    expected = np.where(np.array(sizes)[clusters] >= min_cluster_size, K, SMALL)
    assert got.tolist() == expected.tolist()
