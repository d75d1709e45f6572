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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dask import delayed

from . import schema, sinks, store, summarize
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


# ----------------------------------------------------------------------------- streaming
# Nothing below holds more than a block of rows on the client: the labelled keys go to the
# staging folder as (object_id, code) pairs, the client keeps one byte per object; the
# kept rows are sorted by an external sort (split every part by cluster block, then sort
# each block), and the summary is made of per-block statistics (whole clusters per block).

#: Rows of a cluster block, in store chunks (``ingest.chunk_rows``): what one task of the
#: external sort holds (all columns of its rows, ~10-30 MiB per 8,192-row chunk). Fewer,
#: larger blocks cost less per row (each block reads a piece of every part and runs the
#: summary's pandas steps once).
BLOCK_CHUNKS = 4

_CODE_DTYPE = np.dtype([("object_id", "<i8"), ("code", "i1")])


def save_status_codes(labelled: pd.DataFrame, url: str) -> tuple[int, pd.Series]:
    """Write a labelled partition's statuses as ``(object_id, int8 code)`` records to
    ``url``; returns the largest object id (-1 if none) and the rows per cluster."""
    lookup = {status: i for i, status in enumerate(schema.STATUS_ORDER)}
    records = np.empty(len(labelled), _CODE_DTYPE)
    records["object_id"] = labelled[schema.OBJECT_ID].to_numpy()
    records["code"] = labelled[schema.STATUS].map(lookup).to_numpy()
    fs, path = store.filesystem(url)
    with fs.open(path, "wb") as handle:
        handle.write(records.tobytes())
    sizes = labelled.groupby("cluster").size()
    return int(records["object_id"].max()) if len(records) else -1, sizes


def load_status_codes(urls: list[str], max_id: int) -> np.ndarray:
    """The int8 code array indexed by ``object_id`` from :func:`save_status_codes`'s
    files, read one at a time."""
    codes = np.full(max_id + 1, -1, dtype=np.int8)
    for url in urls:
        fs, path = store.filesystem(url)
        with fs.open(path, "rb") as handle:
            records = np.frombuffer(handle.read(), _CODE_DTYPE)
        codes[records["object_id"]] = records["code"]
    return codes


def cluster_blocks(sizes: pd.Series, target_rows: int) -> np.ndarray:
    """Cut the clusters (``sizes``: rows per cluster id) into blocks of consecutive ids of
    at most ``target_rows`` rows (a larger cluster is a block of its own); returns each
    block's first cluster id, ascending.

    >>> cluster_blocks(pd.Series([5, 5, 20, 1, 1], index=[0, 1, 2, 7, 9]), 10).tolist()
    [0, 2, 7]
    """
    sizes = sizes.sort_index()
    starts, filled = [], 0
    for cluster, n in zip(sizes.index.to_numpy(), sizes.to_numpy(), strict=True):
        if not starts or (filled and filled + n > target_rows):
            starts.append(int(cluster))
            filled = 0
        filled += int(n)
    return np.asarray(starts, dtype=np.int64)


def _order_info(clusters: np.ndarray) -> tuple[int, int, int, bool]:
    """(rows, first, last, ascending) of a part's cluster column, for :func:`_ascending`."""
    if not len(clusters):
        return 0, 0, 0, True
    return len(clusters), int(clusters[0]), int(clusters[-1]), summarize.is_ascending(clusters)


def _ascending(parts: list[tuple[int, int, int, bool]]) -> bool:
    """Whether the parts' clusters, one part after the other, never decrease."""
    previous = None
    for n, first, last, ascending in parts:
        if not n:
            continue
        if not ascending or (previous is not None and first < previous):
            return False
        previous = last
    return True


def split_by_block(
    part_url: str, starts: np.ndarray, url: str
) -> tuple[tuple[int, int, int, bool], tuple[int, int, int, bool]]:
    """Write the rows of one post-processed part to ``url`` as an Arrow IPC file of one
    batch per cluster block (in ``starts``' order; the rows of a block keep their order).
    Returns the order of the part's clusters, of all rows and of the kept rows."""
    fs, path = store.filesystem(part_url)
    table = pq.read_table(path, filesystem=fs)
    clusters = table.column("cluster").to_numpy()
    kept = pc.equal(table.column(schema.STATUS), schema.STATUS_KEPT).to_numpy(zero_copy_only=False)
    order_info = _order_info(clusters), _order_info(clusters[kept])
    block = np.searchsorted(starts, clusters, side="right") - 1
    order = np.argsort(block, kind="stable")
    ends = np.searchsorted(block[order], np.arange(1, len(starts) + 1), side="left")
    columns = [c.combine_chunks() for c in table.take(order).columns]
    batch = pa.RecordBatch.from_arrays(columns, schema=table.schema)
    begins = np.concatenate([[0], ends[:-1]])
    pieces = [batch.slice(int(b), int(e - b)) for b, e in zip(begins, ends, strict=True)]
    sinks.write_ipc_batches(pieces, table.schema, url)
    return order_info


def process_block(
    split_urls: list[str],
    block: int,
    csv_url: str,
    kept_url: str,
    extra: list[str],
    unsorted: tuple[bool, bool] = (True, True),
) -> tuple[pd.DataFrame, pa.Schema, int]:
    """One cluster block: its rows from every part's split file (in table order), its
    kept rows sorted and rendered as CSV rows (``csv_url``) and as the clusters table's
    Arrow rows (``kept_url``); returns the block's :func:`summarize.cluster_stats`
    (``unsorted``: whether the whole table's clusters, and its kept rows', are out of
    ascending order), the kept table's schema and its row count."""
    table = pa.Table.from_batches([sinks.read_ipc_batch(u, block) for u in split_urls])
    stats = summarize.cluster_stats(
        table.select(list(summarize.SUMMARY_COLUMNS)).to_pandas(), *unsorted
    )
    kept = table.filter(pc.equal(table.column(schema.STATUS), schema.STATUS_KEPT)).to_pandas()
    del table
    kept = kept.sort_values(["cluster", "sim", schema.OBJECT_ID], ascending=[True, False, True])
    csv = sinks.csv_bytes(kept, schema.OUTPUT_CSV_FIELDS, schema.CLUSTERS_SCHEMA, header=False)
    fs, path = store.filesystem(csv_url)
    with fs.open(path, "wb") as handle:
        handle.write(csv)
    out = sinks.to_table(
        kept[[*schema.CLUSTERS_SCHEMA.names, schema.OBJECT_ID, schema.SOURCE_ROW, *extra]],
        schema.CLUSTERS_SCHEMA,
    )
    sinks.write_ipc_table(out, kept_url)
    return stats, out.schema, out.num_rows


def postprocess_stage(context: StageContext, postprocess: PostprocessConfig) -> pd.DataFrame:
    """Stage 4: label every assignment, write the selected rows (CSV and Parquet), the
    post-processed table, the cluster summary and the funnel; returns the funnel.

    Holds O(1) memory per row on the client (one status byte per object): the work is
    done by tasks, a partition or a cluster block at a time, through the staging folder
    (``<staging>/postprocess-<run id>``, removed at the end)."""
    catalog = context.catalog
    centres = catalog.read_centres()
    n_clusters = len(centres)
    staging = store.join(catalog.staging, f"postprocess-{context.plan.run_id}")
    fs, staging_path = store.filesystem(staging)
    fs.makedirs(staging_path, exist_ok=True)
    try:
        return _postprocess(context, postprocess, centres, n_clusters, staging)
    finally:
        if fs.exists(staging_path):
            fs.rm(staging_path, recursive=True)


def _postprocess(
    context: StageContext,
    postprocess: PostprocessConfig,
    centres: np.ndarray,
    n_clusters: int,
    staging: str,
) -> pd.DataFrame:
    catalog, ex = context.catalog, context.executor
    # 1. Label (one shuffle of the key columns by cluster); statuses to the staging folder.
    keys = dd.read_parquet(catalog.assignments, columns=key_columns(postprocess))
    labelled_keys = apply_postprocessing(postprocess, keys).to_delayed()
    code_urls = [store.join(staging, f"codes-{i:05d}.bin") for i in range(len(labelled_keys))]
    saved = ex.compute(
        [delayed(save_status_codes)(part, url) for part, url in zip(labelled_keys, code_urls, strict=True)],
        desc="postprocess",
    )  # fmt: skip
    max_id = max((m for m, _ in saved), default=-1)
    sizes = pd.concat([s for _, s in saved]) if saved else pd.Series([], dtype="int64")
    sizes = sizes.groupby(level=0).sum()
    del saved
    codes = load_status_codes(code_urls, max_id)

    # 2. The post-processed table: every assignment row with its status.
    codes_task = delayed(codes, pure=True)
    assignments = dd.read_parquet(catalog.assignments)
    labelled = assignments.map_partitions(
        attach_status, codes_task, meta=attach_status(assignments._meta, np.zeros(0, np.int8))
    )
    metadata = {**context.metadata, "n_clusters": n_clusters}
    table_schema = schema.with_extra_fields(schema.ASSIGNMENTS_SCHEMA, catalog.objects_schema())
    extra = table_schema.names[len(schema.ASSIGNMENTS_SCHEMA) :]  # the CSV's extra columns
    sinks.write_parquet_dataset(
        labelled, catalog.postprocessed, table_schema, metadata,
        compute=lambda graph: ex.compute(graph, desc="postprocessed table"),
    )  # fmt: skip
    del codes, codes_task, labelled

    # 3. External sort: split every part by cluster block, then one task per block.
    starts = cluster_blocks(sizes, BLOCK_CHUNKS * context.plan.chunk_rows)
    parts = sinks.part_urls(catalog.postprocessed)
    split_urls = [store.join(staging, f"split-{i:05d}.arrow") for i in range(len(parts))]
    orders = ex.compute(
        [delayed(split_by_block)(p, starts, u) for p, u in zip(parts, split_urls, strict=True)],
        desc="postprocess: split by cluster",
    )  # fmt: skip
    unsorted = (not _ascending([a for a, _ in orders]), not _ascending([k for _, k in orders]))
    csv_urls = [store.join(staging, f"block-{b:05d}.csv") for b in range(len(starts))]
    kept_urls = [store.join(staging, f"block-{b:05d}.arrow") for b in range(len(starts))]
    blocks = ex.compute(
        [delayed(process_block)(split_urls, b, csv_urls[b], kept_urls[b], list(extra), unsorted)
         for b in range(len(starts))],
        desc="postprocess: sort and render by cluster",
    )  # fmt: skip

    # 4. The client: concatenate the pieces in block order; the summary from the stats.
    header = sinks.csv_bytes(
        pd.DataFrame({c: pd.Series([], dtype=object) for c in schema.OUTPUT_CSV_FIELDS}),
        schema.OUTPUT_CSV_FIELDS, schema.CLUSTERS_SCHEMA, header=True,
    )  # fmt: skip
    sinks.concat_files(csv_urls, catalog.clusters_csv, head=header)
    filled = [b for b, (_, _, n) in enumerate(blocks) if n]
    if filled:
        clusters_schema = sinks.unify_piece_schemas([blocks[b][1] for b in filled])
        pieces = (sinks.read_ipc_table(kept_urls[b]) for b in filled)
    else:  # nothing kept: the empty table as the whole-table conversion gives it
        empty = sinks.read_parquet(
            catalog.postprocessed, filters=[(schema.STATUS, "==", schema.STATUS_KEPT)]
        )
        empty = sinks.to_table(
            empty[[*schema.CLUSTERS_SCHEMA.names, schema.OBJECT_ID, schema.SOURCE_ROW, *extra]],
            schema.CLUSTERS_SCHEMA,
        )
        clusters_schema, pieces = empty.schema, iter([empty])
    sinks.write_parquet_pieces(pieces, catalog.clusters_parquet, clusters_schema, metadata)
    stats = (
        pd.concat([s for s, _, _ in blocks])
        if blocks
        else summarize.cluster_stats(
            sinks.read_parquet(catalog.postprocessed, columns=list(summarize.SUMMARY_COLUMNS))
        )
    )
    summary = summarize.summary_from_stats(stats, centres, catalog.read_cluster_ids())
    sinks.write_parquet(summary, catalog.cluster_summary, schema.CLUSTER_SUMMARY_SCHEMA, metadata)
    info = catalog.read_ingest_summary()
    funnel = summarize.funnel_from_stats(info["n_input_rows"], info["rejected"], stats)
    sinks.write_parquet(funnel, catalog.funnel, schema.FUNNEL_SCHEMA, metadata)
    return funnel
