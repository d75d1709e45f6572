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


def attach_status(part: pd.DataFrame, codes: np.ndarray) -> pd.DataFrame:
    """Add the ``status`` column to a partition of full assignment rows."""
    names = np.array(schema.STATUS_ORDER, dtype=object)
    out = part.copy()
    out[schema.STATUS] = pd.array(names[codes[part[schema.OBJECT_ID].to_numpy()]], dtype="str")
    return out


# ----------------------------------------------------------------------------- streaming
# Nothing below holds more than a block of rows in one place (and the client one status
# byte per object): the assignments are split by cluster block into the staging folder (a
# file per part), then one task per block of whole clusters labels its rows, sorts its kept
# rows into CSV and Arrow pieces and summarises its clusters; the client concatenates the
# pieces in block order. An external sort: no shuffle held in memory, no table gathered.

#: Rows of a cluster block, in store chunks (``ingest.chunk_rows``): what one task of the
#: external sort holds (all columns of its rows, ~10-30 MiB per 8,192-row chunk). Fewer,
#: larger blocks cost less per row (each block reads a piece of every part and runs the
#: summary's pandas steps once).
BLOCK_CHUNKS = 4

#: The split files' column of each row's position in the assignments table.
POSITION = "__position"

_CODE_DTYPE = np.dtype([("object_id", "<i8"), ("code", "i1")])
_CODES = {status: i for i, status in enumerate(schema.STATUS_ORDER)}


def write_status_codes(object_ids: np.ndarray, codes: np.ndarray, url: str) -> int:
    """Write ``(object_id, int8 code into STATUS_ORDER)`` records to ``url``; returns the
    largest object id (-1 if none)."""
    records = np.empty(len(object_ids), _CODE_DTYPE)
    records["object_id"] = object_ids
    records["code"] = codes
    fs, path = store.filesystem(url)
    with fs.open(path, "wb") as handle:
        handle.write(records.tobytes())
    return int(records["object_id"].max()) if len(records) else -1


def load_status_codes(urls: list[str], max_id: int) -> np.ndarray:
    """The int8 code array indexed by ``object_id`` from :func:`write_status_codes`'s
    files, read one at a time."""
    codes = np.full(max_id + 1, -1, dtype=np.int8)
    for url in urls:
        fs, path = store.filesystem(url)
        with fs.open(path, "rb") as handle:
            records = np.frombuffer(handle.read(), _CODE_DTYPE)
        codes[records["object_id"]] = records["code"]
    return codes


def part_cluster_sizes(part_url: str) -> pd.Series:
    """Rows per cluster of one assignments part (its ``cluster`` column alone)."""
    fs, path = store.filesystem(part_url)
    clusters = pq.read_table(path, filesystem=fs, columns=["cluster"]).column("cluster")
    return pd.Series(clusters.to_numpy()).value_counts(sort=False)


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


def split_by_block(
    part_url: str, offset: int, starts: np.ndarray, url: str, columns: list[str] | None = None
) -> int:
    """Write the rows of one assignments part (the first at table position ``offset``) to
    ``url`` as an Arrow IPC file of one batch per cluster block (in ``starts``' order; a
    block's rows keep their order), each row with its table position. Returns the rows.
    ``columns``: the part's columns to keep (all by default)."""
    fs, path = store.filesystem(part_url)
    table = pq.read_table(path, filesystem=fs, columns=columns)
    table = table.append_column(POSITION, pa.array(np.arange(len(table)) + offset))
    block = np.searchsorted(starts, table.column("cluster").to_numpy(), side="right") - 1
    order = np.argsort(block, kind="stable")
    ends = np.searchsorted(block[order], np.arange(1, len(starts) + 1), side="left")
    columns = [c.combine_chunks() for c in table.take(order).columns]
    batch = pa.RecordBatch.from_arrays(columns, schema=table.schema)
    begins = np.concatenate([[0], ends[:-1]])
    pieces = [batch.slice(int(b), int(e - b)) for b, e in zip(begins, ends, strict=True)]
    sinks.write_ipc_batches(pieces, table.schema, url)
    return len(table)


def _order_info(positions: np.ndarray, clusters: np.ndarray) -> tuple[int, int, int, bool]:
    """(rows, first position, last position, clusters ascending) of a block's rows."""
    if not len(clusters):
        return 0, 0, 0, True
    ascending = summarize.is_ascending(clusters)
    return len(clusters), int(positions[0]), int(positions[-1]), ascending


def _ascending(blocks: list[tuple[int, int, int, bool]]) -> bool:
    """Whether the whole table's clusters never decrease, from its blocks' order infos (in
    block order: each block's clusters are below the next one's, so the table is ascending
    when each block is and every block's rows come before the next block's)."""
    previous = None
    for n, first, last, ascending in blocks:
        if not n:
            continue
        if not ascending or (previous is not None and first < previous):
            return False
        previous = last
    return True


def block_table(split_urls: list[str], block: int) -> pa.Table:
    """The rows of cluster block ``block``, from every part's split file (see
    :func:`split_by_block`), in table order."""
    return pa.Table.from_batches([sinks.read_ipc_batch(u, block) for u in split_urls])


def label_block(cfg: PostprocessConfig, split_urls: list[str], block: int, codes_url: str) -> dict:
    """Label one block of whole clusters with :func:`label_rows`; writes the status codes
    of its rows, in its row order, to ``codes_url``. Returns the largest object id and the
    order infos (for :func:`_ascending`) of the block's rows and of its kept rows."""
    table = block_table(split_urls, block)
    keys = table.select(key_columns(cfg)).to_pandas()
    keys["__row"] = np.arange(len(keys))
    labelled = label_rows(keys, cfg.dedupe_key, cfg.min_similarity, cfg.min_cluster_size)
    codes = np.empty(len(keys), np.int8)
    codes[labelled["__row"].to_numpy()] = labelled[schema.STATUS].map(_CODES).to_numpy()
    max_id = write_status_codes(table.column(schema.OBJECT_ID).to_numpy(), codes, codes_url)
    positions = table.column(POSITION).to_numpy()
    clusters = table.column("cluster").to_numpy()
    kept = codes == _CODES[schema.STATUS_KEPT]
    orders = _order_info(positions, clusters), _order_info(positions[kept], clusters[kept])
    return {"max_id": max_id, "orders": orders}


def render_block(
    split_urls: list[str],
    block: int,
    urls: dict[str, str],
    extra: list[str],
    table_schema: pa.Schema,
    unsorted: tuple[bool, bool],
) -> dict:
    """One labelled block: its rows as the post-processed table holds them (``table_schema``,
    with its pandas metadata, so that they convert to pandas as that table's rows do); the
    kept rows sorted as CSV rows (``urls["csv"]``) and as the clusters table's Arrow rows
    (``urls["kept"]``). Returns the block's :func:`summarize.cluster_stats` (``unsorted``:
    whether the whole table's clusters, and its kept rows', are out of ascending order),
    the kept table's schema and its rows."""
    table = block_table(split_urls, block).drop_columns([POSITION])
    fs, path = store.filesystem(urls["codes"])
    with fs.open(path, "rb") as handle:
        codes = np.frombuffer(handle.read(), _CODE_DTYPE)["code"]
    names = np.array(schema.STATUS_ORDER, dtype=object)
    status_at = table_schema.get_field_index(schema.STATUS)
    table = table.add_column(status_at, table_schema.field(schema.STATUS), pa.array(names[codes]))
    table = table.cast(table_schema)
    rows = table.select(list(summarize.SUMMARY_COLUMNS)).to_pandas()
    stats = summarize.cluster_stats(rows, *unsorted)
    del rows
    kept = table.filter(pa.array(codes == _CODES[schema.STATUS_KEPT])).to_pandas()
    del table
    kept = kept.sort_values(["cluster", "sim", schema.OBJECT_ID], ascending=[True, False, True])
    csv = sinks.csv_bytes(kept, schema.OUTPUT_CSV_FIELDS, schema.CLUSTERS_SCHEMA, header=False)
    fs, path = store.filesystem(urls["csv"])
    with fs.open(path, "wb") as handle:
        handle.write(csv)
    out = sinks.to_table(
        kept[[*schema.CLUSTERS_SCHEMA.names, schema.OBJECT_ID, schema.SOURCE_ROW, *extra]],
        schema.CLUSTERS_SCHEMA,
    )
    sinks.write_ipc_table(out, urls["kept"])
    return {"stats": stats, "schema": out.schema, "kept": out.num_rows}


def postprocess_stage(context: StageContext, postprocess: PostprocessConfig) -> pd.DataFrame:
    """Stage 4: label every assignment, write the selected rows (CSV and Parquet), the
    post-processed table, the cluster summary and the funnel; returns the funnel.

    Holds O(1) memory per row on the client (one status byte per object): the work is
    done by tasks, a part or a cluster block at a time, through the staging folder
    (``<staging>/postprocess-<run id>``, removed at the end), which on a cluster every
    worker must see (as the output folder)."""
    catalog = context.catalog
    staging = store.join(catalog.staging, f"postprocess-{context.plan.run_id}")
    fs, staging_path = store.filesystem(staging)
    fs.makedirs(staging_path, exist_ok=True)
    try:
        return _postprocess(context, postprocess, staging)
    finally:
        if fs.exists(staging_path):
            fs.rm(staging_path, recursive=True)


def _postprocess(context: StageContext, cfg: PostprocessConfig, staging: str) -> pd.DataFrame:
    catalog, ex = context.catalog, context.executor
    centres = catalog.read_centres()
    metadata = {**context.metadata, "n_clusters": len(centres)}
    table_schema = schema.with_extra_fields(schema.ASSIGNMENTS_SCHEMA, catalog.objects_schema())
    extra = list(table_schema.names[len(schema.ASSIGNMENTS_SCHEMA) :])  # carried columns

    # 1. Rows per cluster -> blocks of whole clusters; every part split by block.
    parts = sinks.part_urls(catalog.assignments)
    part_sizes = ex.compute([delayed(part_cluster_sizes)(p) for p in parts],
                            desc="postprocess: cluster sizes")  # fmt: skip
    sizes = pd.concat(part_sizes).groupby(level=0).sum() if parts else pd.Series([], dtype="int64")
    offsets = np.concatenate([[0], np.cumsum([int(s.sum()) for s in part_sizes])])
    del part_sizes
    starts = cluster_blocks(sizes, BLOCK_CHUNKS * context.plan.chunk_rows)
    split_urls = [store.join(staging, f"split-{i:05d}.arrow") for i in range(len(parts))]
    ex.compute(
        [delayed(split_by_block)(p, int(offsets[i]), starts, split_urls[i])
         for i, p in enumerate(parts)],
        desc="postprocess: split by cluster",
    )  # fmt: skip

    # 2. A task per block: label its rows (status codes to the staging folder).
    urls = [
        {name: store.join(staging, f"block-{b:05d}.{name}") for name in ("codes", "csv", "kept")}
        for b in range(len(starts))
    ]
    labels = ex.compute(
        [delayed(label_block)(cfg, split_urls, b, urls[b]["codes"]) for b in range(len(starts))],
        desc="postprocess",
    )  # fmt: skip

    # 3. The post-processed table: every assignment row with its status (one byte per
    # object on the client, shipped to the tasks).
    codes = load_status_codes(
        [u["codes"] for u in urls], max((b["max_id"] for b in labels), default=-1)
    )
    assignments = dd.read_parquet(catalog.assignments)
    labelled = assignments.map_partitions(
        attach_status,
        delayed(codes, pure=True),
        meta=attach_status(assignments._meta, np.zeros(0, np.int8)),
    )
    sinks.write_parquet_dataset(
        labelled, catalog.postprocessed, table_schema, metadata,
        compute=lambda graph: ex.compute(graph, desc="postprocessed table"),
    )  # fmt: skip
    del codes, labelled

    # 4. A task per block: its kept rows sorted, rendered (CSV, Arrow), its clusters summed
    # up; as the post-processed table's rows (its first part's schema and pandas metadata).
    written = sinks.part_urls(catalog.postprocessed)
    if written:
        fs, path = store.filesystem(written[0])
        table_schema = pq.read_schema(path, filesystem=fs)
    unsorted = (
        not _ascending([b["orders"][0] for b in labels]),
        not _ascending([b["orders"][1] for b in labels]),
    )
    blocks = ex.compute(
        [delayed(render_block)(split_urls, b, urls[b], extra, table_schema, unsorted)
         for b in range(len(starts))],
        desc="postprocess: sort and render by cluster",
    )  # fmt: skip

    # 5. The client: the pieces concatenated in block order; the summary from the stats.
    header = sinks.csv_bytes(
        pd.DataFrame({c: pd.Series([], dtype=object) for c in schema.OUTPUT_CSV_FIELDS}),
        schema.OUTPUT_CSV_FIELDS, schema.CLUSTERS_SCHEMA, header=True,
    )  # fmt: skip
    sinks.concat_files([u["csv"] for u in urls], catalog.clusters_csv, head=header)
    filled = [b for b, block in enumerate(blocks) if block["kept"]]
    if filled:
        clusters_schema = sinks.unify_piece_schemas([blocks[b]["schema"] for b in filled])
        pieces = (sinks.read_ipc_table(urls[b]["kept"]) for b in filled)
    else:  # nothing kept: the empty table as the whole table's conversion gives it
        empty = sinks.read_parquet(
            catalog.postprocessed, filters=[(schema.STATUS, "==", schema.STATUS_KEPT)]
        )
        empty = sinks.to_table(
            empty[[*schema.CLUSTERS_SCHEMA.names, schema.OBJECT_ID, schema.SOURCE_ROW, *extra]],
            schema.CLUSTERS_SCHEMA,
        )
        clusters_schema, pieces = empty.schema, iter([empty])
    sinks.write_parquet_pieces(pieces, catalog.clusters_parquet, clusters_schema, metadata)
    if blocks:
        stats = pd.concat([b["stats"] for b in blocks])
    else:  # no rows at all
        rows = sinks.read_parquet(catalog.postprocessed, columns=list(summarize.SUMMARY_COLUMNS))
        stats = summarize.cluster_stats(rows)
    summary = summarize.summary_from_stats(stats, centres, catalog.read_cluster_ids())
    sinks.write_parquet(summary, catalog.cluster_summary, schema.CLUSTER_SUMMARY_SCHEMA, metadata)
    info = catalog.read_ingest_summary()
    funnel = summarize.funnel_from_stats(info["n_input_rows"], info["rejected"], stats)
    sinks.write_parquet(funnel, catalog.funnel, schema.FUNNEL_SCHEMA, metadata)
    return funnel
