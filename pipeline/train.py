"""Stage 2: fit the centres. Returns a lazy graph; the executor computes it.

1. k-means++ (float32) on the first ``init_size`` rows of the store: because the store is
   written in a seeded random order, that is a uniform sample of the whole dataset.
2. ``MiniBatchKMeans.partial_fit`` over every block, epoch after epoch, in the plan's seeded
   block order, as a chain of tasks: each task reads its block from the store and receives
   the model from the previous task, so the model (a few MB) travels to the data, as in
   dask-ml's ``Incremental``. Every block is itself a random sample, so each mini-batch
   holds rows from the whole dataset, not from a few users.
With ``metric: cosine`` the same chain fits spherical mini-batch k-means instead
(:class:`SphericalModel`): each block is L2-normalised in the task's read buffer as it is
read (the store is never copied), k-means++ seeds on the normalised sample, each
mini-batch update (:func:`pipeline.kernels.spherical_minibatch_step`) renormalises the
centres, and after each block, centres that won fewer than ``reseed_min_members`` rows per
``16 x n_clusters`` rows streamed since their seeding, and sink clusters (large, with a
mean cosine under half the typical one), are re-seeded among the block's worst-served
rows (:func:`pipeline.kernels.reseed_from_block`). Every re-seed is logged in the
model's history.

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

from . import choose_k, ids, kernels, sinks, store
from .catalog import Catalog, read_model_centres, read_model_ids
from .config import PostprocessConfig, TrainConfig
from .context import StageContext
from .errors import MissingInputError
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


def seeding_projection(plan: TrainPlan, cfg: TrainConfig) -> int | None:
    """``init_projection_dim`` where seeding on the projection is the cheaper way."""
    return kernels.seeding_projection_dim(plan.n_clusters, plan.dim, cfg.init_projection_dim)


def init_model(url: str, plan: TrainPlan, cfg: TrainConfig) -> FittedModel:
    """k-means++ on the store's first ``init_size`` rows (a uniform random sample)."""
    with threadpool_limits(plan.blas_threads):
        sample = store.read_rows(url, 0, plan.init_size)
        centres = kernels.kmeans_plusplus(
            sample, plan.n_clusters, plan.seed, seeding_projection(plan, cfg), overwrite_sample=True
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


def centres_of(model: FittedModel | SphericalModel) -> np.ndarray:
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


# --------------------------------------------------------------------------- cosine


@dataclass
class SphericalModel:
    """Spherical mini-batch k-means state carried from block to block.

    Attributes
    ----------
    unit_centres : float32 (k, dim), unit rows
    counts : float64 (k,), members accumulated over the fit (the update's weights)
    members, sim_sums : members won and the sum of their cosines since each centre's
        (re)seeding
    seen : int64 (k,), rows streamed since each centre's (re)seeding
    """

    unit_centres: np.ndarray
    counts: np.ndarray
    members: np.ndarray
    sim_sums: np.ndarray
    seen: np.ndarray
    history: list[dict] = field(default_factory=list)
    metric: str = "cosine"

    @property
    def centres(self) -> np.ndarray:
        return self.unit_centres


def init_spherical_model(url: str, plan: TrainPlan, cfg: TrainConfig) -> SphericalModel:
    """k-means++ in the cosine metric: on the normalised rows of the uniform sample."""
    with threadpool_limits(plan.blas_threads):
        sample = store.read_rows(url, 0, plan.init_size)
        kernels.normalize_rows(sample, out=sample)
        centres = kernels.kmeans_plusplus(
            sample, plan.n_clusters, plan.seed, seeding_projection(plan, cfg), overwrite_sample=True
        )
        del sample
    k = plan.n_clusters
    return SphericalModel(
        unit_centres=kernels.normalize_rows(centres),
        counts=np.zeros(k, np.float64),
        members=np.zeros(k, np.int64),
        sim_sums=np.zeros(k, np.float64),
        seen=np.zeros(k, np.int64),
        history=[{"step": "init", "rows": plan.init_size, "metric": "cosine"}],
    )


def find_sinks(model: SphericalModel) -> np.ndarray:
    """Centres that are large (>= 2x the median members) with a mean cosine under half
    the median one: they collect what no other centre serves (a sink)."""
    alive = model.members > 0
    if alive.sum() < 3:
        return np.empty(0, np.int64)
    mean_sim = np.zeros_like(model.sim_sums)
    mean_sim[alive] = model.sim_sums[alive] / model.members[alive]
    size_cut = 2 * np.median(model.members[alive])
    sim_cut = 0.5 * np.median(mean_sim[alive])
    return np.flatnonzero(alive & (model.members >= size_cut) & (mean_sim < sim_cut))


def find_dead(model: SphericalModel, min_members: int, window: int) -> np.ndarray:
    """Centres that, over at least ``window`` rows streamed since their seeding, won fewer
    than ``min_members`` rows per ``window`` rows."""
    checked = model.seen >= window
    return np.flatnonzero(checked & (model.members * window < min_members * model.seen))


def spherical_fit_block(
    model: SphericalModel,
    url: str,
    start: int,
    stop: int,
    plan: TrainPlan,
    cfg: TrainConfig,
    epoch: int,
    block_index: int,
) -> SphericalModel:
    """Read one block, normalise it in place, feed it to the spherical mini-batch update,
    then re-seed dead and sink centres among the block's worst-served rows.

    Works on a copy, so a retried task starts from the same model. Deterministic: the
    re-seeding draws from a generator seeded by (seed, epoch, block).
    """
    model = copy.deepcopy(model)
    with threadpool_limits(plan.blas_threads):
        block = store.read_rows_reusing_buffer(url, start, stop)
        kernels.normalize_rows(block, out=block)
        sims = np.empty(len(block), np.float32)
        for offset in range(0, len(block), plan.batch_size):
            batch = block[offset : offset + plan.batch_size]
            model.unit_centres, model.counts, labels, batch_sims = kernels.spherical_minibatch_step(
                batch, model.unit_centres, model.counts
            )
            sims[offset : offset + len(batch)] = batch_sims
            model.members += np.bincount(labels, minlength=len(model.counts))
            model.sim_sums += np.bincount(labels, weights=batch_sims, minlength=len(model.counts))
            model.seen += len(batch)
        if cfg.reseed_min_members > 0 or cfg.sink_split:
            reseed_centres(model, block, sims, plan, cfg, epoch, block_index)
    return model


def reseed_centres(
    model: SphericalModel,
    block: np.ndarray,
    sims: np.ndarray,
    plan: TrainPlan,
    cfg: TrainConfig,
    epoch: int,
    block_index: int,
) -> None:
    """Re-seed dead centres and split sinks (in place on ``model``), logging what it did."""
    dead = (
        find_dead(model, cfg.reseed_min_members, plan.reseed_window)
        if cfg.reseed_min_members > 0
        else np.empty(0, np.int64)
    )
    sinks = find_sinks(model) if cfg.sink_split else np.empty(0, np.int64)
    sinks = np.setdiff1d(sinks, dead)
    targets = np.concatenate([dead, sinks]).astype(np.int64)
    if len(targets) == 0:
        return
    rng = np.random.default_rng([plan.seed, epoch, block_index])
    new, captured = kernels.reseed_from_block(
        block, sims, len(targets), rng, min_captured=max(3, cfg.reseed_min_members + 1)
    )
    replaced = targets[: len(new)]
    entry = {
        "step": "reseed", "epoch": epoch, "block": int(block_index),
        "dead": int(len(dead)), "sinks": [
            {"cluster": int(j), "members": int(model.members[j]),
             "mean_sim": round(float(model.sim_sums[j] / model.members[j]), 4)}
            for j in sinks
        ],
        "reseeded": [int(j) for j in replaced], "captured": [int(c) for c in captured],
    }  # fmt: skip
    model.unit_centres[replaced] = new
    model.counts[replaced] = captured
    model.members[replaced] = 0
    model.sim_sums[replaced] = 0.0
    model.seen[replaced] = 0
    model.history.append(entry)


def spherical_block_sums(
    url: str, start: int, stop: int, centres: np.ndarray, blas_threads: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Read and normalise one block; its spherical Lloyd statistics."""
    with threadpool_limits(blas_threads):
        block = store.read_rows_reusing_buffer(url, start, stop)
        kernels.normalize_rows(block, out=block)
        return kernels.spherical_cluster_sums(block, centres)


def spherical_lloyd_update(
    model: SphericalModel,
    stats: tuple[np.ndarray, np.ndarray, float],
    iteration: int,
    url: str,
    plan: TrainPlan,
    cfg: TrainConfig,
) -> SphericalModel:
    """Each centre becomes the normalised sum of its members; an empty one stays. Then
    centres that won too few rows in this pass (the chain's rule: fewer than
    ``reseed_min_members`` per ``16 x n_clusters`` rows) are re-seeded among the
    worst-served rows of one seeded block, as in the chain: a full-batch pass would
    otherwise leave them wasted to the end."""
    sums, counts, sim_total = stats
    model = copy.deepcopy(model)
    filled = counts > 0
    model.unit_centres[filled] = kernels.normalize_rows(sums[filled].astype(np.float32))
    entry = {"step": f"refine {iteration}", "mean_sim_before": sim_total / max(1, int(counts.sum())),
             "empty_clusters": int((~filled).sum())}  # fmt: skip
    model.history.append(entry)
    if cfg.reseed_min_members <= 0:
        return model
    dead = np.flatnonzero(counts * plan.reseed_window < cfg.reseed_min_members * plan.n_rows)
    if len(dead) == 0:
        return model
    rng = np.random.default_rng([plan.seed, plan.epochs, iteration])
    block_index = int(rng.integers(plan.n_blocks))
    with threadpool_limits(plan.blas_threads):
        block = store.read_rows_reusing_buffer(url, *plan.block_bounds(block_index))
        kernels.normalize_rows(block, out=block)
        _, sims = kernels.best_cosine(block, model.unit_centres)
        new, captured = kernels.reseed_from_block(
            block, sims, len(dead), rng, min_captured=max(3, cfg.reseed_min_members + 1)
        )
    replaced = dead[: len(new)]
    model.unit_centres[replaced] = new
    model.counts[replaced] = captured
    model.members[replaced], model.sim_sums[replaced], model.seen[replaced] = 0, 0.0, 0
    entry.update(starved=int(len(dead)), block=block_index,
                 reseeded=[int(j) for j in replaced], captured=[int(c) for c in captured])  # fmt: skip
    return model


def finish_spherical(model: SphericalModel, cfg: TrainConfig, plan: TrainPlan) -> SphericalModel:
    """Log what the fit ends with: centres still starved and sinks left (flagged)."""
    model = copy.deepcopy(model)
    sinks = find_sinks(model)
    model.history.append({
        "step": "final",
        "starved": int(len(find_dead(model, max(1, cfg.reseed_min_members), plan.reseed_window))),
        "flagged_sinks": [int(j) for j in sinks],
        "reseeds": int(sum(len(h.get("reseeded", [])) for h in model.history)),
    })  # fmt: skip
    return model


def cosine_estimator(centres: np.ndarray, plan: TrainPlan):
    """A scikit-learn estimator that predicts like the cosine model on raw rows:
    ``Normalizer`` then a ``MiniBatchKMeans`` holding the unit centres (on unit rows the
    nearest centre is the one of largest cosine)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    km = MiniBatchKMeans(
        n_clusters=len(centres), init=centres, n_init=1, batch_size=plan.batch_size,
        random_state=plan.seed, reassignment_ratio=0.0, compute_labels=False,
    )  # fmt: skip
    km.partial_fit(centres)  # sets the fitted attributes; each centre is its own member
    km.cluster_centers_ = np.array(centres, dtype=np.float32)
    return make_pipeline(Normalizer(), km)


# --------------------------------------------------------------------------- graph


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
    if plan.metric == "cosine":
        return fit_spherical(cfg, plan, store_url)
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


def fit_spherical(cfg: TrainConfig, plan: TrainPlan, store_url: str) -> delayed:
    """The cosine fit's lazy graph (same shape as the Euclidean one)."""
    model = delayed(init_spherical_model, pure=True)(store_url, plan, cfg)
    for epoch, order in enumerate(plan.block_orders):
        for block in order:
            start, stop = plan.block_bounds(block)
            model = delayed(spherical_fit_block, pure=True)(
                model, store_url, start, stop, plan, cfg, epoch, block
            )
    for iteration in range(1, plan.refine_iterations + 1):
        centres = delayed(centres_of, pure=True)(model)
        stats = [
            delayed(spherical_block_sums, pure=True)(store_url, *plan.block_bounds(b), centres, 1)
            for b in range(plan.n_blocks)
        ]
        model = delayed(spherical_lloyd_update, pure=True)(
            model, _tree_reduce(stats, add_stats), iteration, store_url, plan, cfg
        )
    return delayed(finish_spherical, pure=True)(model, cfg, plan)


def training_plan(train: TrainConfig, context: StageContext) -> TrainPlan:
    """The fit's plan, from the train section and the ingested store's shape."""
    return plan_training(train, *context.catalog.store_shape(), context.plan.blas_threads)


def previous_model_of(catalog: Catalog, train: TrainConfig) -> str | None:
    """The model whose ids a new fit keeps: ``train.previous_model``, else the output
    folder's model (read before it is overwritten), else ``None``."""
    if not train.keep_ids:
        return None
    if train.previous_model is not None:
        if not catalog.exists(store.join(train.previous_model, "centers.npy")):
            raise MissingInputError(
                f"train.previous_model {train.previous_model} holds no centers.npy. Name a "
                "run's model/ folder, or unset train.previous_model."
            )
        return train.previous_model
    return catalog.model if catalog.exists(store.join(catalog.model, "centers.npy")) else None


def member_labels(
    url: str, rows: int, fits: list[tuple[np.ndarray, str]], blas_threads: int
) -> list[np.ndarray]:
    """The centre row of each of the store's first ``rows`` rows (a uniform sample: the
    store is shuffled) under each ``(centres, metric)`` fit, block by block, assigned as
    predict assigns (:func:`pipeline.predict.assign_rows`)."""
    from .predict import assign_rows

    prepared = []
    for centres, metric in fits:
        centres = np.ascontiguousarray(centres, dtype=np.float32)
        prepared.append((centres, kernels.row_sq_norms(centres), metric))
    labels = [np.empty(rows, np.int64) for _ in fits]
    chunk_rows = store.open_store(url)[store.VECTORS].chunks[0]
    with threadpool_limits(blas_threads):
        for start in range(0, rows, chunk_rows):
            stop = min(rows, start + chunk_rows)
            block = store.read_rows_reusing_buffer(url, start, stop)
            for out, (centres, sq_norms, metric) in zip(labels, prepared, strict=True):
                out[start:stop] = assign_rows(block, centres, sq_norms, metric)["cluster"]
    return labels


def number_clusters(
    catalog: Catalog,
    train: TrainConfig,
    centres: np.ndarray,
    metric: str | None = None,
    blas_threads: int = 1,
) -> tuple[ids.IdMatch, dict]:
    """Ids for the new centres (:mod:`pipeline.ids`) and what ``model.json`` records.

    Pairs qualify by centre cosine, or (``metric`` given) by member Jaccard on the store's
    first ``MEMBER_ROWS_PER_CLUSTER x k`` rows (a uniform sample), each labelled by the
    previous centres in the previous model's metric and by the new ones in ``metric``.
    """
    previous = previous_model_of(catalog, train)
    if previous is None:
        return ids.fresh_ids(len(centres)), {"previous_model": None}
    old_centres, old_ids = read_model_centres(previous), read_model_ids(previous)
    description_url = store.join(previous, "model.json")
    old_info = sinks.read_json(description_url) if catalog.exists(description_url) else {}
    retired = np.asarray(old_info.get("ids", {}).get("retired", []), np.int64)
    if old_centres.shape[1] != centres.shape[1]:
        log.warning("cluster ids: the previous model %s has dimension %d, this fit %d: no "
                    "cluster kept its id", previous, old_centres.shape[1], centres.shape[1])  # fmt: skip
        old_centres, retired, old_ids = (
            old_centres[:0, :0],
            np.union1d(retired, old_ids),
            old_ids[:0],
        )
        centres_for_match = centres[:, :0]
    else:
        centres_for_match = centres
    jaccard, member_rows = None, 0
    if metric is not None and len(old_centres):
        n_rows = catalog.store_shape()[0]
        member_rows = min(n_rows, ids.MEMBER_ROWS_PER_CLUSTER * max(len(centres), len(old_centres)))
        new_labels, old_labels = member_labels(
            catalog.store, member_rows,
            [(centres, metric), (old_centres, old_info.get("metric", "euclidean"))],
            blas_threads,
        )  # fmt: skip
        jaccard = ids.member_jaccard(new_labels, old_labels, len(centres), len(old_centres))
    match = ids.match_ids(
        old_centres, centres_for_match, old_ids, retired, jaccard=jaccard, member_rows=member_rows
    )
    info = {"previous_model": previous, "previous_metric": old_info.get("metric")}
    kept = previous_kept_clusters(previous, old_ids)
    if kept is not None:
        # What a groups file needs: the clusters the reviewer could pick (kept ones).
        info["previous_kept"] = len(kept)
        info["previous_kept_matched"] = len(kept & set(match.matched.tolist()))
        info["previous_kept_ids"] = sorted(int(c) for c in kept)
    return match, info


def previous_kept_clusters(previous: str, old_ids: np.ndarray) -> set[int] | None:
    """Clusters the previous model's run kept after post-processing (its
    ``cluster_summary.parquet`` beside the model, when it describes the same ids)."""
    url = store.join(previous.rstrip("/").rsplit("/", 1)[0], "cluster_summary.parquet")
    fs, path = store.filesystem(url)
    if not fs.exists(path):
        return None
    summary = sinks.read_parquet(url, columns=["cluster", "size_final"])
    if sorted(summary["cluster"].tolist()) != sorted(old_ids.tolist()):
        return None
    return set(summary.loc[summary["size_final"] > 0, "cluster"].tolist())


def train_stage(context: StageContext, train: TrainConfig, postprocess: PostprocessConfig) -> None:
    """Stage 2: fit the centres (choosing k first if it is ``auto``) and save the model,
    renumbered after the previous one (:mod:`pipeline.ids`)."""
    sweep = None
    if train.n_clusters == "auto":
        sweep = choose_k.sweep_store(context.catalog, train, postprocess, context.plan.blas_threads)
        log.info("%s", sweep.describe())
        train = train.model_copy(update={"n_clusters": sweep.chosen})
    plan = training_plan(train, context)
    log.info("%r", plan)
    model = context.executor.compute(
        fit_centroids(train, plan, context.catalog.store), desc="train"
    )
    match, previous = number_clusters(
        context.catalog, train, centres_of(model), plan.metric, plan.blas_threads
    )
    centres, cluster_ids, order = ids.sort_by_id(centres_of(model), match.ids)
    if previous["previous_model"] is not None:
        kept = previous.get("previous_kept_matched"), previous.get("previous_kept")
        log.info("%s", match.summary_line(kept if kept[1] is not None else None))
    if plan.metric == "cosine":
        model.unit_centres = centres
        estimator = cosine_estimator(model.centres, plan)
        params = {"algorithm": "spherical mini-batch k-means", "n_clusters": plan.n_clusters,
                  "batch_size": plan.batch_size, "epochs": plan.epochs,
                  "reseed_min_members": train.reseed_min_members,
                  "reseed_window": plan.reseed_window, "sink_split": train.sink_split,
                  "random_state": plan.seed}  # fmt: skip
        final = model.history[-1]
        log.info("cosine fit: %d re-seeds, %d starved centres, sinks flagged: %s",
                 final["reseeds"], final["starved"], final["flagged_sinks"])  # fmt: skip
    else:
        estimator = model.estimator
        estimator.cluster_centers_ = centres
        if hasattr(estimator, "_counts"):
            estimator._counts = estimator._counts[order]
        params = {k: v for k, v in model.estimator.get_params().items() if k != "init"}
    description = {**context.metadata, "plan": repr(plan), "metric": plan.metric,
                   "params": params, "history": model.history,
                   "ids": {**match.describe(), **previous}}  # fmt: skip
    tables = {}
    if sweep is not None:
        description["k_sweep"] = {"chosen": sweep.chosen, "rule": choose_k.RULE,
                                  "sample_rows": sweep.sample_rows}  # fmt: skip
        tables[choose_k.TABLE_NAME] = sweep.table
    context.catalog.write_model(centres, estimator, description, tables, cluster_ids)
