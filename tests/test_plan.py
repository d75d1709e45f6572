"""``pipeline/plan.py``: pure functions from config (and input shape) to frozen plans.

Expected values are written out by hand; the invariants (permutations, clipping,
monotone estimates) are checked with hypothesis.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import plan as planning
from pipeline.catalog import Catalog
from pipeline.config import Config, ExecutorConfig, TrainConfig
from pipeline.errors import ConfigError, InputError
from pipeline.plan import (
    WorkerPlan,
    effective_chunk_rows,
    effective_n_clusters,
    estimate_resources,
    plan_run,
    plan_training,
    plan_workers,
    shuffle_seed,
)


def config(tmp_path, **sections) -> Config:
    data = {"output": {"dir": str(tmp_path / "out")}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Config.model_validate(data)


# ----------------------------------------------------------------------------- plan_run


def test_plan_run_keeps_pipeline_order_whatever_the_request_order(tmp_path):
    cfg = config(tmp_path)
    assert plan_run(cfg).stages == ("ingest", "train", "predict", "postprocess", "report")
    assert plan_run(cfg, ("report", "ingest", "train")).stages == ("ingest", "train", "report")
    assert plan_run(cfg, ("predict",)).stages == ("predict",)
    assert plan_run(cfg, ()).stages == ()


def test_plan_run_rejects_unknown_stage(tmp_path):
    with pytest.raises(ConfigError, match=r"Stage names must be among .*'fit'"):
        plan_run(config(tmp_path), ("ingest", "fit"))


def test_plan_run_rejects_chunks_smaller_than_k(tmp_path):
    cfg = config(tmp_path, ingest={"chunk_rows": 599}, train={"n_clusters": 600})
    with pytest.raises(ConfigError, match=r"ingest.chunk_rows must be >= train.n_clusters \(600\)"):
        plan_run(cfg)
    # Equal is enough; with 'auto' k is known only from the data, so nothing is checked here.
    assert plan_run(config(tmp_path, ingest={"chunk_rows": 600})).chunk_rows == 600
    auto = config(tmp_path, ingest={"chunk_rows": 10}, train={"n_clusters": "auto"})
    assert plan_run(auto).chunk_rows == 10


def test_plan_run_derived_values(tmp_path, monkeypatch):
    cfg = config(
        tmp_path,
        ingest={"shuffle_seed": 5, "chunk_rows": 1024},
        train={"seed": 9, "blas_threads": 3},
        executor={"scheduler": "local-cluster", "n_workers": 2, "threads_per_worker": 2},
    )
    run = plan_run(cfg)
    assert run.scheduler == "local-cluster"
    assert run.workers == WorkerPlan(2, 2)
    assert run.blas_threads == 3 and run.shuffle_seed == 5 and run.chunk_rows == 1024
    assert run.catalog == Catalog.from_config(cfg.output)
    # Unset blas_threads: every core of the machine.
    monkeypatch.setattr(planning, "local_cores", lambda: 7)
    assert plan_run(config(tmp_path)).blas_threads == 7
    assert "stages: ingest -> train" in repr(plan_run(config(tmp_path)))


# ----------------------------------------------------------------------------- workers


@pytest.mark.parametrize(
    ("executor", "cores", "expected"),
    [
        (dict(scheduler="local-cluster"), 16, (4, 4)),
        (dict(scheduler="local-cluster"), 2, (2, 1)),
        (dict(scheduler="local-cluster"), 3, (3, 1)),
        (dict(scheduler="local-cluster"), 6, (4, 1)),
        (dict(scheduler="local-cluster", n_workers=3), 16, (3, 5)),
        (dict(scheduler="local-cluster", threads_per_worker=2), 16, (4, 2)),
        (dict(scheduler="local-cluster", n_workers=8), 2, (8, 1)),
        (dict(scheduler="threads"), 16, (16, 1)),
        (dict(scheduler="processes", n_workers=5), 16, (5, 1)),
        (dict(scheduler="synchronous"), 2, (2, 1)),
        (dict(scheduler="tcp://10.0.0.1:8786"), 8, (8, 1)),
    ],
)
def test_plan_workers_table(executor, cores, expected):
    assert plan_workers(ExecutorConfig(**executor), cores=cores) == WorkerPlan(*expected)


@settings(max_examples=100, deadline=None)
@given(cores=st.integers(1, 256))
def test_local_cluster_default_never_oversubscribes(cores):
    w = plan_workers(ExecutorConfig(scheduler="local-cluster"), cores=cores)
    assert w.n_workers >= 1 and w.threads_per_worker >= 1
    assert w.n_cores <= cores
    assert w.n_workers == min(4, cores)


def test_shuffle_seed_falls_back_to_train_seed(tmp_path):
    assert shuffle_seed(config(tmp_path, train={"seed": 9})) == 9
    assert shuffle_seed(config(tmp_path, train={"seed": 9}, ingest={"shuffle_seed": 4})) == 4
    # 0 is a seed, not "unset".
    assert shuffle_seed(config(tmp_path, train={"seed": 9}, ingest={"shuffle_seed": 0})) == 0


@pytest.mark.parametrize(
    ("chunk_rows", "n_rows", "expected"),
    [(8192, 1000, 1000), (8192, 10**6, 8192), (8192, 8192, 8192), (256, 257, 256), (5, 0, 1)],
)
def test_effective_chunk_rows_table(chunk_rows, n_rows, expected):
    assert effective_chunk_rows(chunk_rows, n_rows) == expected


@given(chunk_rows=st.integers(1, 10**6), n_rows=st.integers(0, 10**7))
def test_effective_chunk_rows_invariant(chunk_rows, n_rows):
    c = effective_chunk_rows(chunk_rows, n_rows)
    assert 1 <= c <= chunk_rows
    assert c == chunk_rows or c == max(n_rows, 1)


@pytest.mark.parametrize(
    ("n_rows", "target", "expected"),
    [(61751, 100, 618), (1_000_000, 100, 10_000), (1000, 100, 10), (1049, 100, 10),
     (1051, 100, 11), (49, 100, 1), (1, 100, 1), (500, 50, 10)],
)  # fmt: skip
def test_effective_n_clusters_auto(n_rows, target, expected):
    train = TrainConfig(n_clusters="auto", target_cluster_size=target)
    assert effective_n_clusters(train, n_rows) == expected


def test_effective_n_clusters_fixed_ignores_rows():
    assert effective_n_clusters(TrainConfig(n_clusters=37), 10) == 37


# ----------------------------------------------------------------------------- plan_training


def test_plan_training_hand_computed():
    p = plan_training(TrainConfig(n_clusters=20, batch_size=300, epochs=3, seed=4), 2500, 16,
                      512, blas_threads=2)  # fmt: skip
    assert (p.n_rows, p.dim, p.chunk_rows, p.n_clusters) == (2500, 16, 512, 20)
    assert p.n_blocks == 5  # ceil(2500 / 512)
    assert [p.block_bounds(b) for b in range(5)] == [
        (0, 512), (512, 1024), (1024, 1536), (1536, 2048), (2048, 2500)
    ]  # fmt: skip
    assert p.batch_size == 300 and p.init_size == 640  # 32 x k
    assert (p.epochs, p.refine_iterations, p.seed, p.blas_threads) == (3, 0, 4, 2)
    # The order is numpy's seeded permutation, one draw per epoch.
    rng = np.random.default_rng(4)
    assert p.block_orders == tuple(tuple(rng.permutation(5).tolist()) for _ in range(3))
    assert "blocks=5" in repr(p) and "epoch 1 block order=[" in repr(p)


@pytest.mark.parametrize(
    ("train", "n_rows", "chunk_rows", "batch", "init", "chunk"),
    [
        (dict(n_clusters=10, batch_size=8192), 5000, 1000, 1000, 320, 1000),  # batch <= chunk
        (dict(n_clusters=10, batch_size=64), 5000, 1000, 64, 320, 1000),
        (dict(n_clusters=10, batch_size=8192), 300, 8192, 300, 300, 300),  # all rows one chunk
        (dict(n_clusters=10, init_size=5), 5000, 1000, 1000, 10, 1000),  # at least k rows
        (dict(n_clusters=10, init_size=4000), 3000, 1000, 1000, 3000, 1000),  # at most n rows
        (dict(n_clusters=10, init_size=77), 3000, 1000, 1000, 77, 1000),
        (dict(n_clusters="auto", target_cluster_size=100), 2000, 8192, 2000, 640, 2000),
    ],
)
def test_plan_training_clips_sizes(train, n_rows, chunk_rows, batch, init, chunk):
    p = plan_training(TrainConfig(**train), n_rows, 8, chunk_rows, 1)
    assert (p.batch_size, p.init_size, p.chunk_rows) == (batch, init, chunk)


def test_plan_training_infeasible():
    with pytest.raises(InputError, match=r"train.n_clusters must be <= the number of ingested"):
        plan_training(TrainConfig(n_clusters=101), 100, 8, 1000, 1)
    assert plan_training(TrainConfig(n_clusters=100), 100, 8, 1000, 1).n_clusters == 100
    with pytest.raises(ConfigError, match=r"ingest.chunk_rows must be >= train.n_clusters"):
        plan_training(TrainConfig(n_clusters=50), 1000, 8, 49, 1)
    # 'auto' resolves first: 100,000 rows / 100 = 1,000 clusters > 512-row chunks.
    with pytest.raises(ConfigError):
        plan_training(TrainConfig(n_clusters="auto"), 100_000, 8, 512, 1)


@settings(max_examples=60, deadline=None)
@given(
    n_rows=st.integers(1, 50_000),
    chunk_rows=st.integers(1, 5000),
    epochs=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 20),
    batch=st.integers(1, 10_000),
)
def test_plan_training_block_orders(n_rows, chunk_rows, epochs, seed, k, batch):
    train = TrainConfig(n_clusters=k, epochs=epochs, seed=seed, batch_size=batch)
    if k > n_rows or min(chunk_rows, n_rows) < k or batch < k:
        with pytest.raises((InputError, ConfigError)):
            plan_training(train, n_rows, 4, chunk_rows, 1)
        return
    p = plan_training(train, n_rows, 4, chunk_rows, 1)
    n_blocks = math.ceil(n_rows / min(chunk_rows, n_rows))
    assert p.n_blocks == n_blocks
    assert len(p.block_orders) == epochs
    for order in p.block_orders:
        assert sorted(order) == list(range(n_blocks))  # every block once per epoch
    # The blocks tile the rows exactly.
    bounds = [p.block_bounds(b) for b in range(n_blocks)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n_rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert all(0 < stop - start <= p.chunk_rows for start, stop in bounds)
    assert 1 <= p.batch_size <= p.chunk_rows and k <= p.init_size <= n_rows
    # The first partial_fit call gets >= k rows (scikit-learn needs them).
    start, stop = p.block_bounds(p.block_orders[0][0])
    assert stop - start >= k and min(p.batch_size, stop - start) >= k
    # Reproducible from the seed alone.
    assert plan_training(train, n_rows, 4, chunk_rows, 8).block_orders == p.block_orders


def test_another_seed_gives_another_order():
    def orders(seed: int):
        return plan_training(TrainConfig(n_clusters=5, epochs=3, seed=seed), 100_000, 4, 1000,
                             1).block_orders  # fmt: skip

    assert orders(0) == orders(0)
    assert orders(0) != orders(1)
    # Epochs are separate draws, not one order repeated.
    assert len(set(orders(0))) == 3


# ----------------------------------------------------------------------------- estimates


def test_estimate_resources_shape_terms():
    """The terms that follow from the shape alone, by hand (the measured per-row constants
    are left free: they are re-measured as the code changes)."""
    n, dim, chunk, k = 1_000_000, 1792, 8192, 600
    e = estimate_resources(n, dim, chunk, k, 2)
    assert set(e) == {"ingest", "train", "predict", "postprocess", "report"}
    vectors, block, model = n * dim * 4, chunk * dim * 4, k * dim * 4
    # Ingest leaves the vectors on disk twice (staging memmap + store), plus per-row tables.
    assert e["ingest"].disk_bytes >= 2 * vectors
    wider = estimate_resources(n, dim + 1, chunk, k, 2)
    assert wider["ingest"].disk_bytes - e["ingest"].disk_bytes == 2 * n * 4
    # Predict holds one block and its float32 (rows x k) score matrix per worker.
    more = estimate_resources(n, dim, chunk, k, 3)
    assert more["predict"].peak_bytes - e["predict"].peak_bytes == block + chunk * k * 4
    # Train holds at least the k-means++ sample (32 x k rows) and the model.
    assert e["train"].peak_bytes >= 32 * k * dim * 4 + model
    for stage in e.values():
        assert stage.peak_bytes >= 170 * 2**20  # a worker with the libraries loaded


@settings(max_examples=100, deadline=None)
@given(
    n_rows=st.integers(1, 10**7),
    dim=st.integers(1, 4096),
    chunk_rows=st.integers(1, 65536),
    k=st.integers(1, 20_000),
    workers=st.integers(1, 64),
    which=st.sampled_from(["n_rows", "dim", "k"]),
    factor=st.integers(2, 10),
)
def test_estimate_resources_monotone(n_rows, dim, chunk_rows, k, workers, which, factor):
    args = dict(n_rows=n_rows, dim=dim, k=k)
    bigger = {**args, which: args[which] * factor}

    def estimate(a):
        return estimate_resources(a["n_rows"], a["dim"], chunk_rows, a["k"], workers)

    small, large = estimate(args), estimate(bigger)
    for stage in small:
        assert large[stage].peak_bytes >= small[stage].peak_bytes, stage
        assert large[stage].disk_bytes >= small[stage].disk_bytes, stage
        assert small[stage].peak_bytes > 0 and small[stage].disk_bytes >= 0


def test_estimate_at_scale_follows_cores_and_strategy():
    """Predict divides by every core; the sequential chain only by one worker's cores, so
    with many workers the parallel strategy estimates a shorter fit; ingest (the client)
    does not change with workers."""
    from pipeline.config import TrainConfig
    from pipeline.plan import estimate_at_scale

    seq, par = TrainConfig(), TrainConfig(strategy="parallel")
    one = estimate_at_scale(seq, 10**7, 1792, 600, 1, 8, 8192, 50.0)
    many = estimate_at_scale(seq, 10**7, 1792, 600, 8, 8, 8192, 50.0)
    assert many["predict"].seconds == pytest.approx(one["predict"].seconds / 8)
    assert many["train"].seconds == pytest.approx(one["train"].seconds)
    assert many["ingest"].seconds == one["ingest"].seconds
    parallel = estimate_at_scale(par, 10**7, 1792, 600, 8, 8, 8192, 50.0)
    assert parallel["train"].seconds < 0.5 * many["train"].seconds
    flop = 2.0 * 10**7 * 600 * 1792
    assert one["predict"].seconds == pytest.approx(1.8 * flop / (50e9 * 8))
