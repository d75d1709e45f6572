"""How stable is the clustering? Refit on the uniform sample under several seeds and block
orders, and compare the fits (an opt-in diagnostic: ``pipeline stability``).

The first ``sample_rows`` rows of the shuffled store are a uniform random sample of the
objects. Each fit runs the training code itself (:func:`pipeline.train.fit_centroids`,
Euclidean or cosine as ``train.metric`` says) on that sample, with seed ``train.seed + i``,
which also draws its block order. Every fit then assigns the sample's rows
(:func:`pipeline.predict.assign_rows`), and the partitions are compared:

- the adjusted Rand index (ARI) between every pair of fits;
- per cluster of the reference partition (the saved model's clusters, in its ids, when the
  output folder has a model; else the first fit's), the best-match Jaccard in each other
  fit (members in common over members in either, against the fit's cluster that shares
  the most), and ``found_again``: the share of fits whose best match reaches
  :data:`FOUND_JACCARD` (0.5: more than half of the union is shared, so at most one
  cluster of a fit can match it).

``order="file"`` asks the question of the write-up's design: does the shuffle remove the
order bias? The same sample rows are copied, in CSV order (``object_id``), to a temporary
store, and the fits stream its blocks in that order (the k-means++ sample is then its
first rows, a few users, as a sequential pass over the file sees them). The fits are
compared on the same rows as the shuffled ones.

The cost is estimated (and printed) before anything runs: one pass of
``rows x dim x k`` multiply-adds per epoch and one for the labels, per fit, at a GEMM rate
measured on the spot, times :data:`OVERHEAD` (the fit's reads, normalisation and
re-seeding, measured on the demo).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from . import kernels, sinks, store
from .catalog import Catalog, run_metadata
from .config import Config
from .errors import InputError, must_be
from .plan import effective_n_clusters, local_cores, new_run_id, plan_training, plan_workers

log = logging.getLogger("pipeline")

#: Best-match Jaccard at or above which a cluster counts as found again in a fit.
FOUND_JACCARD = 0.5
#: Measured on the demo (2 quiet cores: train 5.2 s against 0.7 s of GEMM, plus the labels
#: pass): a fit takes about this many times its GEMM time (reads, the per-block
#: normalisation and re-seeding, k-means++).
OVERHEAD = 6.0
ORDERS = ("shuffled", "file")


@dataclass(frozen=True)
class StabilityPlan:
    """What the diagnostic will do and what it should cost."""

    sample_rows: int
    n_rows: int
    dim: int
    n_clusters: int
    seeds: tuple[int, ...]
    orders: tuple[str, ...]
    epochs: int
    gemm_flops: float  # measured float32 GEMM rate, FLOP/s
    reference: str  # "model" or "fit"

    @property
    def n_fits(self) -> int:
        return len(self.seeds) * len(self.orders)

    @property
    def flop_per_fit(self) -> float:
        return 2.0 * self.sample_rows * self.dim * self.n_clusters * (self.epochs + 1)

    @property
    def estimated_seconds(self) -> float:
        return self.n_fits * self.flop_per_fit / self.gemm_flops * OVERHEAD

    @property
    def copy_bytes(self) -> int:
        """Bytes copied to the temporary file-order store (twice: a memmap, then Zarr)."""
        return 2 * self.sample_rows * self.dim * 4 if "file" in self.orders else 0

    def cost_line(self) -> str:
        copy = f", {self.copy_bytes / 2**30:.2f} GiB of temporary disk for the file order" \
            if self.copy_bytes else ""  # fmt: skip
        return (
            f"stability: {len(self.seeds)} fits x {len(self.orders)} order(s) "
            f"({', '.join(self.orders)}) on {self.sample_rows:,} of {self.n_rows:,} rows x "
            f"{self.dim} dims, k = {self.n_clusters}: {self.flop_per_fit / 1e9:,.3g} GFLOP per "
            f"fit, estimated {self.estimated_seconds:,.1f} s at {self.gemm_flops / 1e9:.0f} "
            f"GFLOP/s measured{copy}; reference: the {self.reference}'s clusters"
        )


def measure_gemm_flops(dim: int, k: int, threads: int, rows: int = 2048) -> float:
    """Float32 GEMM rate of this machine at the fit's shape (best of 3, ~0.1 s)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, dim), dtype=np.float32)
    b = rng.standard_normal((k, dim), dtype=np.float32)
    best = math.inf
    with threadpool_limits(threads):
        for _ in range(3):
            start = time.perf_counter()
            a @ b.T
            best = min(best, time.perf_counter() - start)
    return 2.0 * rows * dim * k / max(best, 1e-9)


# --------------------------------------------------------------------------- comparisons


def best_match_jaccard(reference: np.ndarray, other: np.ndarray) -> pd.Series:
    """For each cluster of ``reference``, the largest Jaccard index with a cluster of
    ``other`` (both label arrays of the same rows), indexed by the reference's labels.

    >>> best_match_jaccard(np.array([0, 0, 0, 1, 1]), np.array([5, 5, 7, 7, 7])).tolist()
    [0.6666666666666666, 0.6666666666666666]
    """
    ref_codes, ref_labels = pd.factorize(reference, sort=True)
    oth_codes, _ = pd.factorize(other, sort=True)
    pairs = pd.DataFrame({"r": ref_codes, "o": oth_codes}).value_counts().reset_index(name="n")
    ref_sizes = np.bincount(ref_codes)
    oth_sizes = np.bincount(oth_codes)
    union = ref_sizes[pairs["r"]] + oth_sizes[pairs["o"]] - pairs["n"]
    pairs["j"] = pairs["n"] / union
    best = pairs.groupby("r")["j"].max().reindex(range(len(ref_labels)), fill_value=0.0)
    return pd.Series(best.to_numpy(), index=pd.Index(ref_labels, name="cluster"))


def pairwise_ari(labels: list[np.ndarray]) -> list[float]:
    """Adjusted Rand index of every pair of partitions (in ``itertools.combinations``
    order)."""
    from sklearn.metrics import adjusted_rand_score

    return [float(adjusted_rand_score(a, b)) for a, b in itertools.combinations(labels, 2)]


def cluster_stability(reference: np.ndarray, fits: list[np.ndarray], order: str) -> pd.DataFrame:
    """Per reference cluster: its size in the sample, the share of ``fits`` in which it is
    found again (best-match Jaccard >= :data:`FOUND_JACCARD`), the mean and min Jaccard."""
    best = pd.concat([best_match_jaccard(reference, f) for f in fits], axis=1)
    sizes = pd.Series(reference).value_counts().reindex(best.index)
    return pd.DataFrame(
        {
            "order": order,
            "cluster": best.index.to_numpy().astype(np.int32),
            "size": sizes.to_numpy().astype(np.int64),
            "found_again": (best >= FOUND_JACCARD).mean(axis=1).to_numpy(),
            "jaccard_mean": best.mean(axis=1).to_numpy(),
            "jaccard_min": best.min(axis=1).to_numpy(),
        }
    )


def summarize_order(
    order: str, table: pd.DataFrame, aris: list[float], vs_reference: list[float]
) -> dict:
    """The numbers the summary line prints for one order."""
    weights = table["size"].to_numpy()
    return {
        "order": order,
        "ari_between_fits_mean": float(np.mean(aris)) if aris else None,
        "ari_between_fits_min": float(np.min(aris)) if aris else None,
        "ari_vs_reference_mean": float(np.mean(vs_reference)) if vs_reference else None,
        "clusters_found_again_always": float((table["found_again"] == 1.0).mean()),
        "jaccard_mean": float(table["jaccard_mean"].mean()),
        "rows_in_clusters_found_always": float(
            weights[(table["found_again"] == 1.0).to_numpy()].sum() / max(1, weights.sum())
        ),
    }


# --------------------------------------------------------------------------- execution


def sample_labels(
    url: str, rows: int, centres: np.ndarray, metric: str, cluster_ids: np.ndarray | None = None
) -> np.ndarray:
    """Cluster of each of the store's first ``rows`` rows, block by block (as predict)."""
    from .predict import assign_rows

    centres = np.ascontiguousarray(centres, dtype=np.float32)
    sq_norms = kernels.row_sq_norms(centres)
    chunk_rows = store.open_store(url)[store.VECTORS].chunks[0]
    out = np.empty(rows, np.int64)
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        block = store.read_rows_reusing_buffer(url, start, stop)
        out[start:stop] = assign_rows(block, centres, sq_norms, metric, cluster_ids)["cluster"]
    return out


def file_order_store(source: str, rows: int, url: str, memmap_path: str) -> np.ndarray:
    """Copy the first ``rows`` rows of the store at ``source`` to a new store at ``url`` in
    CSV order; returns, for each new row, its row in ``source``."""
    from .ingest.embeddings import open_memmap

    group = store.open_store(source)
    dim = group[store.VECTORS].shape[1]
    chunk_rows = group[store.VECTORS].chunks[0]
    object_ids = np.asarray(group[store.OBJECT_IDS][:rows])
    order = np.argsort(object_ids, kind="stable")
    memmap = open_memmap(memmap_path, rows, dim)
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        store.read_rows(source, start, stop, out=memmap[start:stop])
    store.mirror_to_store(memmap, order, url, chunk_rows, "none", {}, progress=False)
    del memmap
    return order


def run_stability(
    cfg: Config,
    n_seeds: int = 3,
    sample_rows: int | None = None,
    orders: tuple[str, ...] = ("shuffled",),
    echo: Callable[[str], None] = print,
    dry_run: bool = False,
) -> str:
    """Run the diagnostic on the ingested store of ``cfg``; write ``stability.parquet``
    (one row per order and reference cluster) and ``stability.json`` (ARIs, summary) to the
    output folder, and return the printed summary.
    """
    from .executor import open_executor
    from .lock import output_lock
    from .train import fit_centroids

    if n_seeds < 2:
        raise InputError(must_be("The number of seeds", ">= 2", n_seeds))
    bad = [o for o in orders if o not in ORDERS]
    if bad:
        raise InputError(must_be("order", f"among {list(ORDERS)}", bad[0]))
    catalog = Catalog.from_config(cfg.output)
    n_rows, dim, chunk_rows = catalog.store_shape()
    rows = min(sample_rows or n_rows, n_rows)
    blas = cfg.train.blas_threads or local_cores()  # as the train stage's plan
    metric = cfg.train.metric
    has_model = catalog.exists(store.join(catalog.model, "centers.npy"))
    if has_model and catalog.read_centres().shape[1] != dim:
        has_model = False
    # The model's k when there is one (n_clusters: auto chose it by a sweep).
    k = len(catalog.read_centres()) if has_model else effective_n_clusters(cfg.train, n_rows)
    train = cfg.train.model_copy(update={"n_clusters": k})
    plan = StabilityPlan(
        sample_rows=rows, n_rows=n_rows, dim=dim, n_clusters=k,
        seeds=tuple(cfg.train.seed + i for i in range(n_seeds)), orders=tuple(orders),
        epochs=train.epochs + train.refine_iterations,
        gemm_flops=measure_gemm_flops(dim, k, blas), reference="model" if has_model else "fit",
    )  # fmt: skip
    plan_training(train, rows, dim, chunk_rows, blas)  # checks k <= rows etc.
    echo(plan.cost_line())
    if dry_run:
        return "stability: dry run, nothing fitted."
    started = time.perf_counter()
    run_id = new_run_id()
    tables, summaries, details = [], [], {}
    with (
        output_lock(catalog.root, run_id),
        open_executor(cfg.executor, plan_workers(cfg.executor)) as ex,
    ):
        reference = None
        if has_model:
            reference = sample_labels(catalog.store, rows, catalog.read_centres(),
                                      catalog.read_metric(), catalog.read_cluster_ids())  # fmt: skip
        for order in orders:
            url, memmap_path = catalog.store, None
            if order == "file":
                url = store.join(catalog.staging, f"stability-{run_id}.zarr")
                memmap_path = store.join(catalog.staging, f"stability-{run_id}.f32")
                store.check_writable(catalog.staging, "output.staging_dir")
                file_order_store(catalog.store, rows, url, memmap_path)
            try:
                labels = []
                for seed in plan.seeds:
                    seeded = train.model_copy(update={"seed": seed})
                    fit = plan_training(seeded, rows, dim, chunk_rows, blas)
                    if order == "file":
                        in_order = tuple(range(fit.n_blocks))
                        fit = dataclasses.replace(fit, block_orders=(in_order,) * fit.epochs)
                    model = ex.compute(
                        fit_centroids(seeded, fit, url), desc=f"stability {order} seed {seed}"
                    )
                    labels.append(sample_labels(catalog.store, rows, model.centres, metric))
                    log.info("stability: %s order, seed %d fitted (%.0f s so far)", order, seed,
                             time.perf_counter() - started)  # fmt: skip
            finally:
                if order == "file":
                    _remove(url)
                    _remove(memmap_path)
            ref = reference if reference is not None else labels[0]
            fits = labels if reference is not None else labels[1:]
            aris = pairwise_ari(labels)
            vs_ref = pairwise_ari([ref, *fits])[: len(fits)]
            table = cluster_stability(ref, fits, order)
            tables.append(table)
            summaries.append(summarize_order(order, table, aris, vs_ref))
            details[order] = {"ari_pairs": aris, "ari_vs_reference": vs_ref}
    seconds = time.perf_counter() - started
    table = pd.concat(tables, ignore_index=True)
    metadata = run_metadata(cfg, {"stability": {"plan": plan.cost_line(), "seconds": seconds}})
    sinks.write_parquet(table, catalog.stability, stability_schema(), metadata)
    payload = {"plan": dataclasses.asdict(plan), "estimated_seconds": plan.estimated_seconds,
               "seconds": seconds, "found_jaccard": FOUND_JACCARD, "summary": summaries,
               "details": details}  # fmt: skip
    sinks.write_json(json.loads(json.dumps(payload, default=str)), catalog.stability_summary)
    return summary_text(summaries, plan, seconds, catalog)


def _remove(url: str | None) -> None:
    if url is None:
        return
    fs, path = store.filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def stability_schema():
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("order", pa.string(), nullable=False),
            pa.field("cluster", pa.int32(), nullable=False),
            pa.field("size", pa.int64(), nullable=False),
            pa.field("found_again", pa.float64(), nullable=False),
            pa.field("jaccard_mean", pa.float64(), nullable=False),
            pa.field("jaccard_min", pa.float64(), nullable=False),
        ]
    )


def summary_text(
    summaries: list[dict], plan: StabilityPlan, seconds: float, catalog: Catalog
) -> str:
    """One line per order, then where the tables are."""
    lines = []
    for s in summaries:
        lines.append(
            f"stability ({s['order']} order): ARI between fits {s['ari_between_fits_mean']:.3f} "
            f"(min {s['ari_between_fits_min']:.3f}), vs the {plan.reference} "
            f"{s['ari_vs_reference_mean']:.3f}; {s['clusters_found_again_always']:.1%} of "
            f"the {plan.reference}'s clusters found again in every fit (best-match Jaccard >= "
            f"{FOUND_JACCARD}), holding {s['rows_in_clusters_found_always']:.1%} of the rows; "
            f"mean Jaccard {s['jaccard_mean']:.3f}"
        )
    lines.append(
        f"stability: {seconds:.0f} s (estimated {plan.estimated_seconds:.0f} s). Per cluster: "
        f"{catalog.stability}; ARIs: {catalog.stability_summary}"
    )
    return "\n".join(lines)
