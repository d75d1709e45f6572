"""Stage 4: the write-up's post-processing, as parallel dask work.

All three steps look only inside one cluster, so after one shuffle that puts each cluster
wholly in one partition, every partition is processed independently by
:func:`label_rows`. Rows are never dropped here: each gets a ``status`` saying whether it
is kept or which step removed it, so the funnel and the accounting follow from the table.
"""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
from dask import delayed

from . import schema, sinks, summarize
from .config import PostprocessConfig
from .context import StageContext


def label_rows(
    frame: pd.DataFrame,
    dedupe_key: str | None = "image_name",
    min_similarity: float = 0.7,
    min_cluster_size: int = 10,
) -> pd.DataFrame:
    """Give every row its post-processing ``status``; ``frame`` must hold whole clusters.

    1. inside each cluster, one row per ``dedupe_key`` value: the most similar (ties: the
       lowest ``object_id``) is kept, the others are ``removed:duplicate_image``;
    2. rows with ``sim <= min_similarity`` are ``removed:low_similarity``;
    3. clusters left with fewer than ``min_cluster_size`` rows lose them as
       ``removed:small_cluster``.

    Returns the rows sorted by cluster, descending ``sim``, then ``object_id``.

    >>> t = pd.DataFrame({"object_id": [0, 1, 2], "cluster": [0, 0, 0],
    ...                   "image_name": ["a", "a", "b"], "sim": [0.9, 0.95, 0.5]})
    >>> label_rows(t, min_cluster_size=1)["status"].tolist()
    ['kept', 'removed:duplicate_image', 'removed:low_similarity']
    """
    out = frame.sort_values(
        ["cluster", "sim", schema.OBJECT_ID], ascending=[True, False, True], kind="stable"
    ).reset_index(drop=True)
    status = np.full(len(out), schema.STATUS_KEPT, dtype=object)
    if dedupe_key is not None:
        # Sorted by descending sim, so the first row of each (cluster, key) is the best.
        duplicate = out.duplicated(subset=["cluster", dedupe_key], keep="first").to_numpy()
        status[duplicate] = schema.STATUS_DUPLICATE
    low = (out["sim"].to_numpy() <= min_similarity) & (status == schema.STATUS_KEPT)
    status[low] = schema.STATUS_LOW_SIMILARITY
    alive = status == schema.STATUS_KEPT
    sizes = pd.Series(alive).groupby(out["cluster"].to_numpy()).transform("sum").to_numpy()
    status[alive & (sizes < min_cluster_size)] = schema.STATUS_SMALL_CLUSTER
    out[schema.STATUS] = pd.array(status, dtype="str")
    return out


def key_columns(cfg: PostprocessConfig) -> list[str]:
    """The only columns post-processing looks at (all that the shuffle has to move)."""
    return [schema.OBJECT_ID, "cluster", "sim", *([cfg.dedupe_key] if cfg.dedupe_key else [])]


def apply_postprocessing(
    cfg: PostprocessConfig, assignments: dd.DataFrame, n_partitions: int | None = None
) -> dd.DataFrame:
    """Lazy: shuffle rows so each cluster sits in one partition, then label each partition.

    Pass only :func:`key_columns` to keep the shuffle small; the statuses are then joined
    back onto the full rows with :func:`attach_status`.
    """
    n_partitions = n_partitions or assignments.npartitions
    by_cluster = assignments.shuffle(on="cluster", npartitions=n_partitions)
    meta = assignments._meta.assign(**{schema.STATUS: pd.Series([], dtype="str")})
    return by_cluster.map_partitions(
        label_rows,
        dedupe_key=cfg.dedupe_key,
        min_similarity=cfg.min_similarity,
        min_cluster_size=cfg.min_cluster_size,
        meta=meta,
        align_dataframes=False,
    )


def status_codes_by_object(labelled: pd.DataFrame) -> np.ndarray:
    """Status of every object as an int8 code into :data:`schema.STATUS_ORDER`, indexed by
    ``object_id`` (-1 for ids not present): a compact lookup to ship to every partition."""
    codes = np.full(int(labelled[schema.OBJECT_ID].max()) + 1, -1, dtype=np.int8)
    lookup = {status: i for i, status in enumerate(schema.STATUS_ORDER)}
    codes[labelled[schema.OBJECT_ID].to_numpy()] = labelled[schema.STATUS].map(lookup).to_numpy()
    return codes


def attach_status(part: pd.DataFrame, codes: np.ndarray) -> pd.DataFrame:
    """Add the ``status`` column to a partition of full assignment rows."""
    names = np.array(schema.STATUS_ORDER, dtype=object)
    out = part.copy()
    out[schema.STATUS] = pd.array(names[codes[part[schema.OBJECT_ID].to_numpy()]], dtype="str")
    return out


def postprocess_stage(context: StageContext, postprocess: PostprocessConfig) -> pd.DataFrame:
    """Stage 4: label every assignment, write the selected rows (CSV and Parquet), the
    post-processed table, the cluster summary and the funnel; returns the funnel."""
    catalog, ex = context.catalog, context.executor
    centres = catalog.read_centres()
    n_clusters = len(centres)
    keys = dd.read_parquet(catalog.assignments, columns=key_columns(postprocess))
    statuses = ex.compute(
        apply_postprocessing(postprocess, keys)[[schema.OBJECT_ID, schema.STATUS]],
        desc="postprocess",
    )
    codes = delayed(status_codes_by_object(statuses), pure=True)
    assignments = dd.read_parquet(catalog.assignments)
    labelled = assignments.map_partitions(
        attach_status, codes, meta=attach_status(assignments._meta, np.zeros(0, np.int8))
    )
    metadata = {**context.metadata, "n_clusters": n_clusters}
    table_schema = schema.with_extra_fields(schema.ASSIGNMENTS_SCHEMA, catalog.objects_schema())
    extra = table_schema.names[len(schema.ASSIGNMENTS_SCHEMA) :]  # the CSV's extra columns
    sinks.write_parquet_dataset(
        labelled, catalog.postprocessed, table_schema, metadata,
        compute=lambda graph: ex.compute(graph, desc="postprocessed table"),
    )  # fmt: skip
    kept = sinks.read_parquet(
        catalog.postprocessed, filters=[(schema.STATUS, "==", schema.STATUS_KEPT)]
    )
    kept = kept.sort_values(["cluster", "sim", schema.OBJECT_ID], ascending=[True, False, True])
    sinks.write_csv(kept, catalog.clusters_csv, schema.OUTPUT_CSV_FIELDS, schema.CLUSTERS_SCHEMA)
    sinks.write_parquet(
        kept[[*schema.CLUSTERS_SCHEMA.names, schema.OBJECT_ID, schema.SOURCE_ROW, *extra]],
        catalog.clusters_parquet, schema.CLUSTERS_SCHEMA, metadata,
    )  # fmt: skip
    del kept
    table = sinks.read_parquet(catalog.postprocessed, columns=list(summarize.SUMMARY_COLUMNS))
    summary = summarize.cluster_summary(table, centres, catalog.read_cluster_ids())
    sinks.write_parquet(summary, catalog.cluster_summary, schema.CLUSTER_SUMMARY_SCHEMA, metadata)
    info = catalog.read_ingest_summary()
    funnel = summarize.funnel(info["n_input_rows"], info["rejected"], table)
    sinks.write_parquet(funnel, catalog.funnel, schema.FUNNEL_SCHEMA, metadata)
    return funnel
