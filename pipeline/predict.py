"""Stage 3: assign every stored row to its nearest centre, in parallel over store blocks.

``map_blocks`` over the store's row chunks runs :func:`pipeline.kernels.assign_block` on
each Zarr chunk (one matrix product per block, float32); each block's records are then
attached to the matching part of the row-aligned objects table. Returns a lazy dask
DataFrame, one partition per block.
"""

from __future__ import annotations

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
from dask import delayed
from threadpoolctl import threadpool_limits

from . import kernels, schema, sinks, store
from .context import StageContext


def assign_store_block(
    url: str,
    centres: np.ndarray,
    centre_sq_norms: np.ndarray,
    block_info: dict | None = None,
    metric: str = "euclidean",
    cluster_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Read one store block and assign its rows (one BLAS thread: blocks run in parallel).

    The block is read into this thread's reused buffer (no page faults on a fresh array)
    and only the small records leave the task. With ``metric="cosine"`` the centres are
    unit vectors and each row goes to the centre of largest cosine.
    """
    start, stop = block_info[None]["array-location"][0]
    with threadpool_limits(1):
        block = store.read_rows_reusing_buffer(url, start, stop)
        return assign_rows(block, centres, centre_sq_norms, metric, cluster_ids)


def assign_rows(
    block: np.ndarray,
    centres: np.ndarray,
    centre_sq_norms: np.ndarray,
    metric: str = "euclidean",
    cluster_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Assignment records of a block of raw rows; ``cluster`` is the centre's id
    (``cluster_ids[row]``; ``None``: the row number). Shared by predict and assign, so
    both give the same bytes for the same row."""
    if metric == "cosine":
        records = kernels.assign_block_cosine(block, centres)
    else:
        records = kernels.assign_block(block, centres, centre_sq_norms)
    if cluster_ids is not None:
        records["cluster"] = cluster_ids[records["cluster"]]
    return records


def attach_assignments(objects: pd.DataFrame, records: np.ndarray) -> pd.DataFrame:
    """Objects of one block plus their ``cluster``, ``dist`` and ``sim`` columns."""
    if len(objects) != len(records):
        raise ValueError(f"objects part has {len(objects)} rows, block has {len(records)}")
    out = objects.copy()
    for name in schema.ASSIGNMENT_DTYPE.names:
        out[name] = records[name]
    return out


def assignments_meta(objects_url: str) -> pd.DataFrame:
    """An empty frame with the assignments' columns and dtypes (dask ``meta``)."""
    objects = sinks.read_parquet_part(objects_url, 0).iloc[:0]
    return attach_assignments(objects, np.empty(0, dtype=schema.ASSIGNMENT_DTYPE))


def assign_clusters(
    store_url: str,
    objects_url: str,
    centres: np.ndarray,
    metric: str = "euclidean",
    cluster_ids: np.ndarray | None = None,
) -> dd.DataFrame:
    """Lazy assignments: one partition per store block, rows in store order.

    Parameters
    ----------
    centres : ndarray of shape (n_clusters, n_features)
    metric : {"euclidean", "cosine"}
        Nearest centre, or centre of largest cosine (``dist = sqrt(2 - 2 sim)``).
    cluster_ids : ndarray of shape (n_clusters,), default=None
        The id of each centre row (``model/cluster_ids.npy``); ``None``: ``0..k-1``.
    """
    vectors = store.vectors_array(store_url)
    centres = np.ascontiguousarray(centres, dtype=np.float32)
    records = da.map_blocks(
        assign_store_block,
        store_url,
        delayed(centres, pure=True),
        delayed(kernels.row_sq_norms(centres), pure=True),
        chunks=(vectors.chunks[0],),
        dtype=schema.ASSIGNMENT_DTYPE,
        meta=np.empty((0,), dtype=schema.ASSIGNMENT_DTYPE),
        **({"metric": metric} if metric != "euclidean" else {}),
        **({"cluster_ids": cluster_ids.astype(np.int32)} if cluster_ids is not None else {}),
    )
    blocks = records.to_delayed().ravel()
    parts = [
        delayed(attach_assignments, pure=True)(
            delayed(sinks.read_parquet_part, pure=True)(objects_url, i), block
        )
        for i, block in enumerate(blocks)
    ]
    return dd.from_delayed(parts, meta=assignments_meta(objects_url), verify_meta=False)


def predict_stage(context: StageContext) -> None:
    """Stage 3: write the assignment table (all objects with cluster, dist, sim)."""
    catalog = context.catalog
    centres = catalog.read_centres()
    metric = catalog.read_metric()
    cluster_ids = catalog.read_cluster_ids()
    assignments = assign_clusters(catalog.store, catalog.objects, centres, metric, cluster_ids)
    without_status = schema.ASSIGNMENTS_SCHEMA.remove(
        schema.ASSIGNMENTS_SCHEMA.get_field_index(schema.STATUS)
    )
    sinks.write_parquet_dataset(
        assignments,
        catalog.assignments,
        schema.with_extra_fields(without_status, catalog.objects_schema()),
        {**context.metadata, "n_clusters": len(centres), "metric": metric},
        compute=lambda graph: context.executor.compute(graph, desc="predict"),
    )
