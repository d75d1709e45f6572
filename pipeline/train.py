"""Stage 2: fit the centres. Returns a lazy graph; the executor computes it.

1. k-means++ (float32) on the first ``init_size`` rows of the store: because the store is
   written in a seeded random order, that is a uniform sample of the whole dataset.
2. ``MiniBatchKMeans.partial_fit`` over every block, epoch after epoch, in the plan's seeded
   block order, as a chain of tasks: each task reads its block from the store and receives
   the model from the previous task, so the model (a few MB) travels to the data, as in
   dask-ml's ``Incremental``. Every block is itself a random sample, so each mini-batch
   holds rows from the whole dataset, not from a few users.
3. Optional Lloyd refinement: each iteration is a parallel map-reduce over blocks (cluster
   sums and counts), i.e. one full-batch k-means step; it lowers inertia towards
   full-batch ``KMeans`` at the cost of one pass over the store.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
from dask import delayed
from sklearn.cluster import MiniBatchKMeans
from threadpoolctl import threadpool_limits

from . import kernels, store
from .config import TrainConfig
from .context import StageContext
from .plan import TrainPlan, plan_training

log = logging.getLogger("pipeline")


@dataclass
class FittedModel:
    """The fitted estimator plus how it got there (what the model stage saves)."""

    estimator: MiniBatchKMeans
    history: list[dict] = field(default_factory=list)

    @property
    def centres(self) -> np.ndarray:
        return self.estimator.cluster_centers_


def init_model(url: str, plan: TrainPlan, cfg: TrainConfig) -> FittedModel:
    """k-means++ on the store's first ``init_size`` rows (a uniform random sample)."""
    with threadpool_limits(plan.blas_threads):
        sample = store.read_rows(url, 0, plan.init_size)
        centres = kernels.kmeans_plusplus(
            sample, plan.n_clusters, plan.seed, cfg.init_projection_dim, overwrite_sample=True
        )
        del sample
    estimator = MiniBatchKMeans(
        n_clusters=plan.n_clusters,
        init=centres,
        n_init=1,
        batch_size=plan.batch_size,
        random_state=plan.seed,
        reassignment_ratio=cfg.reassignment_ratio,
        compute_labels=False,
    )
    return FittedModel(estimator, [{"step": "init", "rows": plan.init_size}])


def partial_fit_block(
    model: FittedModel, url: str, start: int, stop: int, batch_size: int, blas_threads: int
) -> FittedModel:
    """Read one block and feed it to ``partial_fit`` in mini-batches of ``batch_size``.

    Works on a copy, so a retried task (a worker lost mid-fit) starts from the same model.
    """
    model = copy.deepcopy(model)
    with threadpool_limits(blas_threads):
        block = store.read_rows_reusing_buffer(url, start, stop)
        for offset in range(0, len(block), batch_size):
            model.estimator.partial_fit(block[offset : offset + batch_size])
    return model


def block_cluster_sums(
    url: str, start: int, stop: int, centres: np.ndarray, blas_threads: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Read one block and return its Lloyd statistics (sums, counts, inertia)."""
    with threadpool_limits(blas_threads):
        block = store.read_rows_reusing_buffer(url, start, stop)
        return kernels.cluster_sums(block, centres, kernels.row_sq_norms(centres))


def add_stats(
    a: tuple[np.ndarray, np.ndarray, float], b: tuple[np.ndarray, np.ndarray, float]
) -> tuple[np.ndarray, np.ndarray, float]:
    """Combine two blocks' Lloyd statistics."""
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def centres_of(model: FittedModel) -> np.ndarray:
    return np.ascontiguousarray(model.centres, dtype=np.float32)


def lloyd_update(
    model: FittedModel, stats: tuple[np.ndarray, np.ndarray, float], iteration: int
) -> FittedModel:
    """Move each centre to the mean of its members; an empty cluster keeps its centre."""
    sums, counts, inertia = stats
    model = copy.deepcopy(model)
    centres = centres_of(model).copy()
    filled = counts > 0
    centres[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    model.estimator.cluster_centers_ = centres
    model.history.append(
        {
            "step": f"refine {iteration}",
            "inertia_before": inertia,
            "empty_clusters": int((~filled).sum()),
        }
    )
    return model


def _tree_reduce(items: list, combine) -> object:
    while len(items) > 1:
        items = [
            delayed(combine, pure=True)(items[i], items[i + 1]) if i + 1 < len(items) else items[i]
            for i in range(0, len(items), 2)
        ]
    return items[0]


def fit_centroids(cfg: TrainConfig, plan: TrainPlan, store_url: str) -> delayed:
    """Build the lazy fit graph; computing it returns a :class:`FittedModel`.

    The sequential ``partial_fit`` tasks use ``plan.blas_threads`` BLAS threads (the
    parallel refinement tasks one each, so they do not oversubscribe the cores); it is
    part of the plan so a local and a distributed run compute identically.
    """
    model = delayed(init_model, pure=True)(store_url, plan, cfg)
    for order in plan.block_orders:
        for block in order:
            start, stop = plan.block_bounds(block)
            model = delayed(partial_fit_block, pure=True)(
                model, store_url, start, stop, plan.batch_size, plan.blas_threads
            )
    for iteration in range(1, plan.refine_iterations + 1):
        centres = delayed(centres_of, pure=True)(model)
        stats = [
            delayed(block_cluster_sums, pure=True)(store_url, *plan.block_bounds(b), centres, 1)
            for b in range(plan.n_blocks)
        ]
        model = delayed(lloyd_update, pure=True)(model, _tree_reduce(stats, add_stats), iteration)
    return model


def training_plan(train: TrainConfig, context: StageContext) -> TrainPlan:
    """The fit's plan, from the train section and the ingested store's shape."""
    return plan_training(train, *context.catalog.store_shape(), context.plan.blas_threads)


def train_stage(context: StageContext, train: TrainConfig) -> None:
    """Stage 2: fit the centres and save the model."""
    plan = training_plan(train, context)
    log.info("%r", plan)
    model = context.executor.compute(
        fit_centroids(train, plan, context.catalog.store), desc="train"
    )
    params = {k: v for k, v in model.estimator.get_params().items() if k != "init"}
    description = {**context.metadata, "plan": repr(plan), "params": params,
                   "history": model.history}  # fmt: skip
    context.catalog.write_model(model.centres, model.estimator, description)
