"""Whole runs on a small demo dataset: outputs, funnel, resume, determinism, quality."""

import hashlib

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr
from sklearn.cluster import KMeans

from pipeline import kernels, schema, sinks
from pipeline.runner import run
from tests.conftest import config_for


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def finished_run(small_dataset, tmp_path_factory):
    cfg = config_for(small_dataset, tmp_path_factory.mktemp("e2e") / "out")
    return cfg, run(cfg)


def test_csv_has_exactly_the_write_up_fields(finished_run):
    cfg, result = finished_run
    header = open(result.catalog.clusters_csv).readline().strip().replace('"', "").split(",")
    assert header == list(schema.OUTPUT_CSV_FIELDS)
    csv = pd.read_csv(result.catalog.clusters_csv)
    parquet = sinks.read_parquet(result.catalog.clusters_parquet)
    assert len(csv) == len(parquet) > 0
    np.testing.assert_allclose(csv["sim"], parquet["sim"], rtol=1e-6)
    assert (csv["sim"] > cfg.postprocess.min_similarity).all()
    meta = sinks.read_run_metadata(result.catalog.clusters_parquet)
    assert meta["config"]["train"]["n_clusters"] == 20 and "versions" in meta


def test_funnel_follows_from_the_assignment_table(finished_run):
    cfg, result = finished_run
    labelled = sinks.read_parquet(result.catalog.postprocessed)
    assignments = sinks.read_parquet(result.catalog.assignments)
    funnel = sinks.read_parquet(result.catalog.funnel)
    assert len(labelled) == len(assignments) == 2000
    # Recompute each step independently with plain pandas.
    dedup = assignments.sort_values(["sim", "object_id"], ascending=[False, True]).drop_duplicates(
        ["cluster", "image_name"]
    )
    similar = dedup[dedup["sim"] > cfg.postprocess.min_similarity]
    sizes = similar.groupby("cluster")["object_id"].transform("size")
    final = similar[sizes >= cfg.postprocess.min_cluster_size]
    expected_rows = [2000, 2000, 2000, 2000, len(dedup), len(similar), len(final)]
    assert funnel["rows"].tolist() == expected_rows
    assert funnel["clusters"].tolist()[3:] == [
        assignments["cluster"].nunique(), dedup["cluster"].nunique(),
        similar["cluster"].nunique(), final["cluster"].nunique(),
    ]  # fmt: skip
    csv = pd.read_csv(result.catalog.clusters_csv)
    assert sorted(zip(csv["image_name"], csv["idx"], strict=False)) == sorted(
        zip(final["image_name"], final["idx"], strict=False)
    )
    summary = sinks.read_parquet(result.catalog.cluster_summary)
    assert summary["size"].sum() == 2000 and summary["size_final"].sum() == len(final)


def test_predict_equals_numpy_reference_on_saved_centres(finished_run):
    _, result = finished_run
    centres = result.catalog.read_centres()
    group = zarr.open_group(result.catalog.store, mode="r")
    vectors, ids = group["vectors"][:], group["object_ids"][:]
    assignments = sinks.read_parquet(result.catalog.assignments).set_index("object_id").loc[ids]
    d = ((vectors[:, None, :].astype(np.float64) - centres[None].astype(np.float64)) ** 2).sum(-1)
    labels = d.argmin(1)
    np.testing.assert_array_equal(assignments["cluster"].to_numpy(), labels)
    np.testing.assert_allclose(assignments["dist"], np.sqrt(d.min(1)), rtol=1e-4, atol=1e-5)
    c = centres[labels].astype(np.float64)
    cos = (vectors * c).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(c, axis=1)
    np.testing.assert_allclose(assignments["sim"], cos, rtol=1e-4, atol=1e-5)


def test_inertia_close_to_full_batch_kmeans(finished_run):
    _, result = finished_run
    centres = result.catalog.read_centres()
    vectors = zarr.open_group(result.catalog.store, mode="r")["vectors"][:]
    ours = kernels.inertia_of(vectors, centres, kernels.row_sq_norms(centres))
    reference = KMeans(n_clusters=20, n_init=1, random_state=0).fit(vectors).inertia_
    assert ours <= 1.03 * reference


def test_rerun_skips_up_to_date_stages_and_redoes_changed_ones(finished_run):
    cfg, result = finished_run
    before = digest(result.catalog.clusters_csv)
    again = run(cfg)
    assert again.skipped == ["ingest", "train", "predict", "postprocess", "report"]
    stricter = cfg.model_copy(
        update={"postprocess": cfg.postprocess.model_copy(update={"min_similarity": 0.8})}
    )
    changed = run(stricter)
    assert changed.skipped == ["ingest", "train", "predict"]
    assert digest(result.catalog.clusters_csv) != before
    restored = run(cfg)
    assert restored.skipped == ["ingest", "train", "predict"]
    assert digest(result.catalog.clusters_csv) == before


def test_same_seed_gives_byte_identical_outputs(small_dataset, tmp_path, finished_run):
    _, first = finished_run
    cfg = config_for(small_dataset, tmp_path / "again")
    second = run(cfg)
    assert digest(first.catalog.clusters_csv) == digest(second.catalog.clusters_csv)
    # Parquet metadata records the (different) output folder; the data must be identical.
    for name in ("clusters_parquet", "cluster_summary", "funnel"):
        a = pq.read_table(getattr(first.catalog, name)).replace_schema_metadata()
        b = pq.read_table(getattr(second.catalog, name)).replace_schema_metadata()
        assert a.equals(b), name
    np.testing.assert_array_equal(first.catalog.read_centres(), second.catalog.read_centres())


def test_distributed_local_cluster_equals_threads(small_dataset, tmp_path, finished_run):
    _, first = finished_run
    cfg = config_for(small_dataset, tmp_path / "cluster",
                     executor={"scheduler": "local-cluster", "n_workers": 2, "threads_per_worker": 1})  # fmt: skip
    second = run(cfg)
    # The work really ran on two worker processes ...
    assert second.executor_kind == "local-cluster"
    assert len(second.worker_transitions) == 2
    assert all(n > 0 for n in second.worker_transitions.values())
    # ... and gave the same bytes as the threaded run.
    assert digest(first.catalog.clusters_csv) == digest(second.catalog.clusters_csv)
    np.testing.assert_array_equal(first.catalog.read_centres(), second.catalog.read_centres())


def test_extra_csv_columns_are_carried_to_every_table(finished_run, small_dataset):
    # raw_tag is an extra column of the input CSV: every table after ingest carries it,
    # row for row (source_row indexes the CSV's data rows); the CSV output does not.
    _, result = finished_run
    source = pd.read_csv(small_dataset.objects_csv, dtype=str)["raw_tag"]
    cat = result.catalog
    for url in (cat.objects, cat.assignments, cat.postprocessed, cat.clusters_parquet):
        table = sinks.read_parquet(url, columns=["source_row", "raw_tag"])
        assert len(table) > 0
        assert table["raw_tag"].tolist() == source.iloc[table["source_row"]].tolist()
    assert "raw_tag" not in pd.read_csv(cat.clusters_csv, nrows=1).columns


@pytest.mark.parametrize("scheduler", ["synchronous", "processes"])
def test_every_scheduler_kind_gives_the_same_bytes(
    small_dataset, tmp_path, finished_run, scheduler
):
    _, first = finished_run
    cfg = config_for(small_dataset, tmp_path / scheduler, executor={"scheduler": scheduler})
    second = run(cfg)
    assert digest(first.catalog.clusters_csv) == digest(second.catalog.clusters_csv)
    np.testing.assert_array_equal(first.catalog.read_centres(), second.catalog.read_centres())


def test_another_seed_changes_the_shuffle_and_the_fit(small_dataset, tmp_path, finished_run):
    _, first = finished_run
    second = run(config_for(small_dataset, tmp_path / "seed1", train={"seed": 1}))
    ids = [zarr.open_group(r.catalog.store, mode="r")["object_ids"][:] for r in (first, second)]
    assert sorted(ids[0]) == sorted(ids[1]) and not np.array_equal(ids[0], ids[1])
    assert not np.array_equal(first.catalog.read_centres(), second.catalog.read_centres())
    # ... while ingest.shuffle_seed pins the store order whatever the fit's seed.
    pinned = [
        run(config_for(small_dataset, tmp_path / f"pin{s}", ingest={"shuffle_seed": 5},
                       train={"seed": s}))
        for s in (0, 1)
    ]  # fmt: skip
    a, b = (zarr.open_group(r.catalog.store, mode="r")["object_ids"][:] for r in pinned)
    np.testing.assert_array_equal(a, b)


def test_output_csv_is_sorted_by_cluster_then_descending_similarity(finished_run):
    _, result = finished_run
    csv = pd.read_csv(result.catalog.clusters_csv)
    parquet = sinks.read_parquet(result.catalog.clusters_parquet)
    keys = list(zip(csv["cluster"], -csv["sim"], parquet["object_id"], strict=True))
    assert keys == sorted(keys)


def test_cluster_health_columns_match_the_assignment_table(finished_run):
    # Independent pandas reading of the post-processed table and numpy of the centres.
    _, result = finished_run
    cat = result.catalog
    summary = sinks.read_parquet(cat.cluster_summary).set_index("cluster")
    table = sinks.read_parquet(cat.postprocessed, columns=["cluster", "username", "sim"])
    for cluster, members in table.groupby("cluster"):
        counts = members["username"].value_counts()
        row = summary.loc[cluster]
        assert row["n_users"] == len(counts)
        assert row["top_user_share"] == pytest.approx(counts.iloc[0] / len(members))
        assert row["sim_min"] == pytest.approx(members["sim"].min())
    centres = cat.read_centres().astype(np.float64)
    unit = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -2)
    assert summary["nearest_cluster"].tolist() == cos.argmax(1).tolist()
