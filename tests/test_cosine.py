"""The cosine metric: spherical mini-batch fit against an independent numpy version,
re-seeding of starved centres, and a whole run with ``train.metric: cosine``."""

import json

import dask
import joblib
import numpy as np
import pandas as pd
import pytest
import zarr
from sklearn.cluster import MiniBatchKMeans

from pipeline import kernels, sinks, store, train
from pipeline.config import TrainConfig
from pipeline.plan import plan_training
from pipeline.runner import run
from tests.conftest import config_for, ingest_only


def reference_spherical_fit(x, centres, orders, chunk_rows, batch_size):
    """Spherical mini-batch k-means written out plainly in float64: rows normalised, each
    centre the renormalised count-weighted mean of its past position and new members."""
    c = centres.astype(np.float64).copy()
    counts = np.zeros(len(c))
    for order in orders:
        for b in order:
            block = x[b * chunk_rows : (b + 1) * chunk_rows].astype(np.float64)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            for s in range(0, len(block), batch_size):
                batch = block[s : s + batch_size]
                labels = (batch @ c.T).argmax(1)
                for j in np.unique(labels):
                    members = batch[labels == j]
                    moved = (counts[j] * c[j] + members.sum(0)) / (counts[j] + len(members))
                    c[j] = moved / np.linalg.norm(moved)
                    counts[j] += len(members)
    return c


def test_spherical_fit_matches_numpy_reference(small_config):
    cfg = small_config.model_copy(update={"train": small_config.train.model_copy(update={
        "metric": "cosine", "refine_iterations": 0, "reseed_min_members": 0,
        "sink_split": False, "batch_size": 128})})  # fmt: skip
    result, catalog = ingest_only(cfg)
    x = zarr.open_group(catalog.store, mode="r")["vectors"][:]
    plan = plan_training(cfg.train, len(x), x.shape[1], cfg.ingest.chunk_rows, 1)
    init = train.init_spherical_model(catalog.store, plan, cfg.train)
    np.testing.assert_allclose(np.linalg.norm(init.unit_centres, axis=1), 1.0, atol=1e-6)
    with dask.config.set(scheduler="synchronous"):
        model = dask.compute(train.fit_centroids(cfg.train, plan, catalog.store))[0]
    expected = reference_spherical_fit(
        x, init.unit_centres, plan.block_orders, plan.chunk_rows, plan.batch_size
    )
    np.testing.assert_allclose(model.centres, expected, atol=2e-4)
    assert model.history[-1]["reseeds"] == 0


def _starving_data(tmp_path):
    """Six tight groups of 300 unit rows, and an initialisation that puts three centres
    on the groups and three far from every row: plain MiniBatchKMeans keeps some empty."""
    rng = np.random.default_rng(0)
    dim, k = 32, 6
    directions = kernels.normalize_rows(rng.standard_normal((k, dim), dtype=np.float32))
    x = np.repeat(directions, 300, axis=0) + 0.05 * rng.standard_normal((k * 300, dim)).astype(
        np.float32
    )
    x = x[rng.permutation(len(x))].astype(np.float32)
    nowhere = -kernels.normalize_rows(directions.sum(0, keepdims=True)).repeat(3, 0)
    nowhere += 0.01 * rng.standard_normal(nowhere.shape).astype(np.float32)
    init = kernels.normalize_rows(np.concatenate([directions[:3], nowhere]).astype(np.float32))
    url = str(tmp_path / "store.zarr")
    group = store.create_store(url, len(x), dim, 300)
    group["vectors"][:] = x
    return x, init, url


def test_reseeding_removes_empty_centres_that_minibatch_kmeans_leaves(tmp_path):
    x, init, url = _starving_data(tmp_path)
    k = len(init)
    plain = MiniBatchKMeans(n_clusters=k, init=init, n_init=1, batch_size=300,
                            reassignment_ratio=0.0, random_state=0)  # fmt: skip
    for s in range(0, len(x), 300):
        plain.partial_fit(x[s : s + 300])
    empty = np.flatnonzero(np.bincount(plain.predict(x), minlength=k) == 0)
    assert len(empty) >= 2 and set(empty) <= {3, 4, 5}

    cfg = TrainConfig(metric="cosine", n_clusters=k, batch_size=300, epochs=1, seed=0)
    plan = plan_training(cfg, len(x), x.shape[1], 300, 1)
    model = train.SphericalModel(init.copy(), np.zeros(k), np.zeros(k, np.int64),
                                 np.zeros(k), np.zeros(k, np.int64))  # fmt: skip
    for block in plan.block_orders[0]:
        model = train.spherical_fit_block(
            model, url, *plan.block_bounds(block), plan, cfg, 0, block
        )
    sizes = np.bincount(kernels.assign_block_cosine(x, model.centres)["cluster"], minlength=k)
    assert (sizes <= 2).sum() == 0
    assert sorted(sizes.tolist()) == [300] * 6  # one centre per group
    reseeds = [h for h in model.history if h["step"] == "reseed"]
    reseeded = {j for h in reseeds for j in h["reseeded"]}
    assert set(empty) <= reseeded <= {3, 4, 5}

    # Deterministic for a seed; turned off, the starved centres stay empty.
    again = train.SphericalModel(init.copy(), np.zeros(k), np.zeros(k, np.int64),
                                 np.zeros(k), np.zeros(k, np.int64))  # fmt: skip
    off = cfg.model_copy(update={"reseed_min_members": 0, "sink_split": False})
    same = again
    for block in plan.block_orders[0]:
        again = train.spherical_fit_block(
            again, url, *plan.block_bounds(block), plan, off, 0, block
        )
        same = train.spherical_fit_block(same, url, *plan.block_bounds(block), plan, off, 0, block)
    np.testing.assert_array_equal(again.centres, same.centres)
    off_sizes = np.bincount(kernels.assign_block_cosine(x, again.centres)["cluster"], minlength=k)
    assert (off_sizes == 0).sum() >= 2


def test_refinement_passes_reseed_starved_centres(tmp_path):
    """Full-batch spherical passes from an initialisation with three centres far from
    every row: without re-seeding those stay empty to the end; with it each pass re-seeds
    the centres that won too few rows, and three passes give one centre per group."""
    x, init, url = _starving_data(tmp_path)
    k = len(init)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)

    def refine(cfg, passes):
        plan = plan_training(cfg, len(x), x.shape[1], 300, 1)
        model = train.SphericalModel(init.copy(), np.zeros(k), np.zeros(k, np.int64),
                                     np.zeros(k), np.zeros(k, np.int64))  # fmt: skip
        for i in range(1, passes + 1):
            parts = [train.spherical_block_sums(url, *plan.block_bounds(b), model.centres, 1)
                     for b in range(plan.n_blocks)]  # fmt: skip
            stats = (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts))
            model = train.spherical_lloyd_update(model, stats, i, url, plan, cfg)
        return model, np.bincount((unit @ model.centres.T).argmax(1), minlength=k)

    cfg = TrainConfig(metric="cosine", n_clusters=k, batch_size=300, seed=0)
    model, sizes = refine(cfg, 3)
    assert sorted(sizes.tolist()) == [300] * 6
    refines = [h for h in model.history if h["step"].startswith("refine")]
    assert refines[0]["starved"] == 3 and refines[0]["reseeded"] == [3, 4, 5]
    assert all(c >= 3 for h in refines for c in h.get("captured", []))

    off, off_sizes = refine(cfg.model_copy(update={"reseed_min_members": 0}), 3)
    assert (off_sizes == 0).sum() >= 2  # measured: sizes 0, 0, 300, 300, 300, 900
    assert not any("reseeded" in h for h in off.history)


def test_sink_cluster_is_found_and_split():
    k = 10
    model = train.SphericalModel(
        np.eye(k, 16, dtype=np.float32), np.ones(k), np.full(k, 100, np.int64),
        np.full(k, 80.0), np.full(k, 1000, np.int64),
    )  # fmt: skip
    model.members[4], model.sim_sums[4] = 900, 900 * 0.1
    assert train.find_sinks(model).tolist() == [4]


@pytest.fixture(scope="module")
def cosine_run(small_dataset, tmp_path_factory):
    cfg = config_for(small_dataset, tmp_path_factory.mktemp("cos") / "out",
                     train={"metric": "cosine"})  # fmt: skip
    return cfg, run(cfg)


def test_end_to_end_cosine_run(cosine_run):
    cfg, result = cosine_run
    catalog = result.catalog
    description = json.loads(open(f"{catalog.model}/model.json").read())
    assert description["metric"] == "cosine" and catalog.read_metric() == "cosine"
    assert description["history"][0]["metric"] == "cosine"
    assert description["history"][-1]["step"] == "final"
    centres = catalog.read_centres()
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1.0, atol=1e-5)

    group = zarr.open_group(catalog.store, mode="r")
    vectors, ids = group["vectors"][:], group["object_ids"][:]
    assignments = sinks.read_parquet(catalog.assignments).set_index("object_id").loc[ids]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos = unit.astype(np.float64) @ centres.T.astype(np.float64)
    chosen = cos[np.arange(len(ids)), assignments["cluster"].to_numpy()]
    np.testing.assert_allclose(chosen, cos.max(1), atol=1e-5)
    np.testing.assert_allclose(assignments["sim"], cos.max(1), atol=1e-5)
    np.testing.assert_allclose(assignments["dist"], np.sqrt(2 - 2 * cos.max(1)), atol=1e-3)

    # The saved estimator normalises raw rows itself and predicts the same clusters.
    estimator = joblib.load(f"{catalog.model}/kmeans.joblib")
    assert (estimator.predict(vectors) == assignments["cluster"].to_numpy()).mean() > 0.999

    csv = pd.read_csv(catalog.clusters_csv)
    assert len(csv) > 0 and (csv["sim"] > cfg.postprocess.min_similarity).all()


def test_cosine_run_is_deterministic(cosine_run, small_dataset, tmp_path):
    _, first = cosine_run
    cfg = config_for(small_dataset, tmp_path / "again", train={"metric": "cosine"})
    second = run(cfg)
    np.testing.assert_array_equal(first.catalog.read_centres(), second.catalog.read_centres())
    assert open(first.catalog.clusters_csv).read() == open(second.catalog.clusters_csv).read()
