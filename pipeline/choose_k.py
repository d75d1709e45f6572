"""``train.n_clusters: auto``: choose k by what the reviewer keeps.

A sweep of candidate k around ``rows / target_cluster_size`` runs quick fits on the store's
uniform sample (its first rows: the store is shuffled) and scores each k by the rows the
post-processing would keep, estimated on that sample:

1. a quick fit per candidate: k-means++ then a few Lloyd iterations on the sample's top
   principal components (of the L2-normalised rows for the cosine metric), the subspace
   the cluster structure lives in, so the sweep costs a few trainings, not one each;
2. each cluster's centre is then the (normalised) mean of its members in full dimension,
   and every sample row's cosine to it is computed, as predict computes ``sim``;
3. the write-up's rules are applied to the sample with :func:`postprocess.label_rows`:
   dedupe per ``dedupe_key`` within a cluster, ``sim > min_similarity``, and clusters of at
   least ``min_cluster_size`` rows *in the whole data* (a sample cluster of ``n`` rows
   stands for ``n / sample share`` rows).

**Rule**: the k with the highest *score* = estimated rows kept - ``min_cluster_size`` x k.
More centres always keep a few more rows (each row is nearer its centre), past the knee by
splitting look-alike groups into near-duplicate clusters that a reviewer then has to merge
again; so each centre must pay for itself with at least a smallest keepable cluster's worth
of kept rows. (On the demo, whose generator has 600 true groups: k = 618 is chosen; at
1,235 the estimate keeps 14 % more rows but in 1.2 kept clusters per true group.) The
curve is saved (``model/k_sweep.parquet``), printed, and shown in the report.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from . import kernels, schema, sinks, store
from .catalog import K_SWEEP_TABLE
from .config import PostprocessConfig, TrainConfig
from .plan import effective_chunk_rows
from .postprocess import label_rows

log = logging.getLogger("pipeline")

#: Candidate k as multiples of ``rows / target_cluster_size``.
CANDIDATE_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
#: The rule, as recorded in ``model.json``.
RULE = "max over candidates of: estimated rows kept - postprocess.min_cluster_size x k"
#: The curve's file in the model folder.
TABLE_NAME = K_SWEEP_TABLE
#: Rows of the sweep's sample (at most): enough for clusters of ~10 rows at the demo scale.
SAMPLE_ROWS = 65_536
#: Lloyd iterations of each quick fit.
QUICK_ITERATIONS = 6


@dataclass(frozen=True)
class KSweep:
    """The sweep's curve (one row per candidate) and the chosen k."""

    table: pd.DataFrame
    chosen: int
    sample_rows: int
    n_rows: int

    def describe(self) -> str:
        row = self.table.loc[self.table["chosen"]].iloc[0]
        curve = ", ".join(f"{int(r.k)}: {int(r.rows_kept_est):,}" for r in self.table.itertuples())
        return (
            f"n_clusters auto: chose k = {self.chosen}, est. {int(row['rows_kept_est']):,} rows "
            f"kept (max of rows kept - min_cluster_size x k, on {self.sample_rows:,} of "
            f"{self.n_rows:,} rows); est. rows kept by k: {curve}"
        )


def candidate_ks(n_rows: int, target_cluster_size: int, max_k: int) -> list[int]:
    """Candidate k around ``n_rows / target_cluster_size``, each in ``[2, max_k]``.

    >>> candidate_ks(61_751, 100, 8_192)
    [154, 309, 463, 618, 926, 1235, 1853]
    >>> candidate_ks(500, 100, 8_192)
    [2, 4, 5, 8, 10, 15]
    """
    base = n_rows / target_cluster_size
    ks = {min(max_k, max(2, round(base * factor))) for factor in CANDIDATE_FACTORS}
    return sorted(ks)


def sweep_cost(sample_rows: int, projection_dim: int, candidates: list[int]) -> float:
    """Floating-point operations of the sweep (seeding + Lloyd on the projected sample)."""
    seeding = 2.0 * sample_rows * projection_dim * max(candidates)
    return seeding + 2.0 * sample_rows * projection_dim * sum(candidates) * (QUICK_ITERATIONS + 1)


def quick_labels(
    projected: np.ndarray, seeds: np.ndarray, iterations: int = QUICK_ITERATIONS
) -> np.ndarray:
    """Cluster labels of a quick fit: Lloyd iterations from the rows ``seeds``.

    For the cosine metric ``projected`` holds projected *unit* rows, where Euclidean
    k-means is spherical k-means up to the dropped components.
    """
    x = projected
    centres = x[seeds].copy()
    for _ in range(iterations):
        sums, counts, _ = kernels.cluster_sums(x, centres, kernels.row_sq_norms(centres))
        filled = counts > 0
        centres[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    return kernels.nearest_centres(x, centres, kernels.row_sq_norms(centres))


def full_dim_similarity(unit_rows: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Each row's cosine to the normalised mean of its cluster's (unit) rows."""
    sums, _ = kernels.label_sums(unit_rows, labels, k)
    centres = kernels.normalize_rows(sums)
    return kernels.row_dots(unit_rows, centres[labels])


def estimate_kept(
    labels: np.ndarray,
    sim: np.ndarray,
    keys: np.ndarray | None,
    sample_share: float,
    min_similarity: float,
    min_cluster_size: int,
) -> tuple[int, int]:
    """``(rows kept, kept clusters)`` of the whole data, estimated from the sample.

    >>> labels = np.array([0, 0, 0, 1, 1])
    >>> estimate_kept(labels, np.array([.9, .9, .5, .9, .9]), None, 1.0, 0.7, 2)
    (4, 2)
    >>> estimate_kept(labels, np.array([.9, .9, .9, .9, .5]), None, 0.5, 0.7, 5)
    (6, 1)
    """
    frame = pd.DataFrame({schema.OBJECT_ID: np.arange(len(labels)), "cluster": labels, "sim": sim})
    if keys is not None:
        frame["_key"] = keys
    needed = max(1, math.ceil(min_cluster_size * sample_share - 1e-9))
    out = label_rows(frame, "_key" if keys is not None else None, min_similarity, needed)
    kept = out[out[schema.STATUS] == schema.STATUS_KEPT]
    return round(len(kept) / sample_share), int(kept["cluster"].nunique())


def choose(table: pd.DataFrame, cost_per_centre: int) -> int:
    """The k of highest ``rows_kept_est - cost_per_centre * k`` (ties: the smaller k).

    >>> t = pd.DataFrame({"k": [10, 20, 40], "rows_kept_est": [800, 995, 1100]})
    >>> choose(t, 10), choose(t, 1)
    (20, 40)
    """
    score = table["rows_kept_est"] - cost_per_centre * table["k"]
    return int(table.loc[score == score.max(), "k"].min())


def sweep_k(
    sample: np.ndarray,
    keys: np.ndarray | None,
    candidates: list[int],
    *,
    n_rows: int,
    metric: str,
    min_similarity: float,
    min_cluster_size: int,
    seed: int,
    projection_dim: int | None,
    blas_threads: int | None = None,
) -> KSweep:
    """Score every candidate k on ``sample`` (float32 rows, a uniform sample of ``n_rows``).

    ``keys`` are the sample rows' dedupe values (``None``: no dedupe). ``sample`` is
    normalised in place.
    """
    share = len(sample) / n_rows
    rows = []
    with threadpool_limits(blas_threads):
        if metric == "cosine":
            kernels.normalize_rows(sample, out=sample)
        if projection_dim is not None and projection_dim < min(sample.shape):
            mean = sample.mean(axis=0, dtype=np.float64).astype(np.float32)
            sample -= mean  # centred in place for the projection, then restored
            projected = kernels.principal_projection(sample, projection_dim, seed)
            sample += mean
        else:
            projected = np.array(sample, dtype=np.float32)
        unit = kernels.normalize_rows(sample, out=sample)
        # k-means++ is sequential, so the first k rows of one seeding for the largest
        # candidate are a k-means++ seeding for k: one seeding serves every candidate.
        seeds = kernels.kmeans_plusplus_indices(projected, max(candidates), seed, trials=1)
        for k in candidates:
            start = time.perf_counter()
            labels = quick_labels(projected, seeds[:k])
            sim = full_dim_similarity(unit, labels, k)
            kept, clusters = estimate_kept(
                labels, sim, keys, share, min_similarity, min_cluster_size
            )
            sizes = np.bincount(labels, minlength=k)
            rows.append(
                {
                    "k": k,
                    "rows_kept_est": kept,
                    "kept_share": kept / n_rows,
                    "kept_clusters_est": clusters,
                    "mean_sim": float(sim.mean()),
                    "small_clusters": int((sizes <= 2).sum()),
                    "seconds": time.perf_counter() - start,
                }
            )
            log.info("k sweep: k = %d, est. rows kept %s", k, f"{kept:,}")
    table = pd.DataFrame(rows)
    table["score"] = table["rows_kept_est"] - min_cluster_size * table["k"]
    chosen = choose(table, min_cluster_size)
    table["chosen"] = table["k"] == chosen
    return KSweep(table, chosen, len(sample), n_rows)


def sweep_store(
    catalog, train: TrainConfig, postprocess: PostprocessConfig, blas_threads: int
) -> KSweep:
    """Run the sweep on the ingested store's uniform sample (its first rows)."""
    n_rows, dim, chunk_rows = catalog.store_shape()
    # Cap the sample at ~256 MiB of float32 rows (it is centred and projected in place).
    m = min(n_rows, SAMPLE_ROWS, max(1, (256 << 20) // (4 * dim)))
    max_k = min(effective_chunk_rows(chunk_rows, n_rows), train.batch_size, m // 2)
    candidates = candidate_ks(n_rows, train.target_cluster_size, max(2, max_k))
    projection = train.init_projection_dim
    flops = sweep_cost(m, min(projection or dim, dim), candidates)
    log.info(
        "n_clusters auto: sweeping k in %s on %s of %s rows (~%.0f GFLOP)",
        candidates, f"{m:,}", f"{n_rows:,}", flops / 1e9,
    )  # fmt: skip
    sample = store.read_rows(catalog.store, 0, m)
    keys = None
    if postprocess.dedupe_key is not None:
        parts = math.ceil(m / chunk_rows)
        keys = pd.concat(
            sinks.read_parquet(
                store.join(catalog.objects, f"part-{c:05d}.parquet"),
                columns=[postprocess.dedupe_key],
            )
            for c in range(parts)
        )[postprocess.dedupe_key].to_numpy()[:m]
    return sweep_k(
        sample, keys, candidates, n_rows=n_rows, metric=train.metric,
        min_similarity=postprocess.min_similarity,
        min_cluster_size=postprocess.min_cluster_size, seed=train.seed,
        projection_dim=projection, blas_threads=blas_threads,
    )  # fmt: skip
