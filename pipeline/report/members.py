"""The report's members: ``postprocessed.parquet`` read a block of whole clusters at a
time, each block in the order of every member list (:func:`pipeline.report.views.order_members`),
so that the report's memory is bounded by the block, not by the run.

A table that fits one block is read once and kept for both passes of the report; a larger
one is first split by block into Arrow files in the staging folder (one per table part, a
batch per block, as post-processing splits the assignments), each block then read back
from the memory-mapped batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import schema, sinks, store
from ..postprocess import POSITION, block_table, cluster_blocks, split_by_block

#: Rows per block (whole clusters; a larger cluster is a block of its own): ~45 MiB of
#: members' columns in pandas, a few thousand cards at a time on top.
BLOCK_ROWS = 100_000


def ordered_members(table: pa.Table) -> pd.DataFrame:
    """``table`` (rows of whole clusters) sorted by cluster, then descending ``sim``
    (ties by ascending ``object_id``), as pandas, with ``rank`` (1 = the most similar of
    its cluster).

    Sorted as one Arrow table and handed to pandas once: concatenating frames and sorting
    in pandas held three copies of the table.
    """
    order = pc.sort_indices(table, sort_keys=[("cluster", "ascending"), ("sim", "descending"),
                                               (schema.OBJECT_ID, "ascending")])  # fmt: skip
    table = table.take(order)
    del order
    pa.default_memory_pool().release_unused()  # the unsorted table
    ordered = table.to_pandas(self_destruct=True, split_blocks=True)
    del table
    pa.default_memory_pool().release_unused()
    ordered["rank"] = ordered.groupby("cluster", sort=False).cumcount() + 1
    return ordered


class MemberBlocks:
    """The rows (``columns``) of the post-processed table at ``url``, a block of whole
    clusters at a time (iterate, as often as needed: blocks in ascending cluster order).

    ``sizes``: rows per cluster (the summary's ``size``), to cut the blocks of
    ``block_rows`` (default :data:`BLOCK_ROWS`); ``staging``:
    a folder for the split files (made and removed here; unused for one block).
    """

    def __init__(
        self, url: str, columns: list[str], sizes: pd.Series, staging: str,
        block_rows: int | None = None, n_threads: int = 1,
    ) -> None:  # fmt: skip
        self.url, self.columns, self.staging = url, columns, staging
        self.starts = cluster_blocks(sizes[sizes > 0], block_rows or BLOCK_ROWS)
        self.n_threads = max(1, n_threads)
        self._whole: pd.DataFrame | None = None
        self._splits: list[str] = []

    def __len__(self) -> int:
        return max(1, len(self.starts))

    def __enter__(self) -> MemberBlocks:
        if len(self.starts) > 1:
            fs, path = store.filesystem(self.staging)
            fs.makedirs(path, exist_ok=True)
            parts = sinks.part_urls(self.url)
            self._splits = [
                store.join(self.staging, f"split-{i:05d}.arrow") for i in range(len(parts))
            ]
            with ThreadPoolExecutor(self.n_threads) as pool:  # Arrow reads without the GIL
                list(pool.map(
                    lambda i: split_by_block(parts[i], 0, self.starts, self._splits[i], self.columns),
                    range(len(parts)),
                ))  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        self._whole = None
        if self._splits:
            fs, path = store.filesystem(self.staging)
            if fs.exists(path):
                fs.rm(path, recursive=True)

    def __iter__(self) -> Iterator[pd.DataFrame]:
        if not self._splits:
            if self._whole is None:
                fs, path = store.filesystem(self.url)
                self._whole = ordered_members(
                    pq.read_table(path, filesystem=fs, columns=self.columns)
                )
            yield self._whole
            return
        for block in range(len(self.starts)):
            pa.default_memory_pool().release_unused()  # what the last block left cached
            yield ordered_members(block_table(self._splits, block).drop_columns([POSITION]))
