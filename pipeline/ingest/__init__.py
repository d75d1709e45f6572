"""Stage 1: objects CSV + embedding files -> memmap (CSV order) -> shuffled Zarr store.

The one stage that streams its input instead of returning lazy dask objects: it reads each
embedding file once, writes the vectors into a ``numpy.memmap`` in CSV order (the
write-up's method), then mirrors the memmap into the Zarr store in a seeded random row
order, one whole chunk at a time, with the row-aligned objects table beside it. Peak
memory is a few chunks, whatever the number of rows.

The jobs are split by module: :mod:`.objects` reads and checks the table (pure checks),
:mod:`.embeddings` reads the vectors, :mod:`pipeline.store` and :mod:`pipeline.sinks`
write the store and the tables. Per-object problems send the object to
``rejects.parquet`` with a reason (the taxonomy is :data:`pipeline.schema.REJECT_REASONS`),
or stop the run when ``ingest.on_bad_object: fail``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .. import schema, sinks, store
from ..catalog import Catalog
from ..config import IngestConfig, InputConfig, SelectConfig
from ..context import StageContext
from ..errors import ConfigError, InputError, must_be
from ..executor import Executor
from ..plan import effective_chunk_rows
from . import objects
from .embeddings import (
    FILES_PER_TASK,
    FileGroups,
    fill_memmap_from_files,
    fill_memmap_from_matrix,
    infer_dim,
    open_matrix,
    open_memmap,
    recording_paths,
)
from .objects import (
    CSV_BLOCK_BYTES,
    _checked_header,
    read_objects_csv,
    rejects_frame,
    stream_objects_csv,
    validate_rows,
)
from .validate import CheckedRows, finish
from .workers import read_on_workers, remove_parts, validate_on_workers, write_on_workers

log = logging.getLogger("pipeline")

__all__ = ["IngestResult", "ingest_objects", "ingest_stage", "read_objects_csv", "validate_rows"]


@dataclass(frozen=True)
class IngestResult:
    """Counts of one ingest; every input row is either ingested or rejected."""

    n_input_rows: int
    n_rows: int
    dim: int
    chunk_rows: int
    rejected: dict[str, int]
    #: The staging memmap (CSV order), or the workers' parts folder; deleted after the
    #: store is written unless ingest.keep_memmap.
    memmap: str

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


def raise_on_bad_object(settings: IngestConfig, csv_path: str, rejects: pd.DataFrame) -> None:
    """With ``ingest.on_bad_object: fail``, turn the first bad row into a one-line error."""
    bad = rejects[rejects["reason"].map(schema.reject_kind) != "selection"]
    if settings.on_bad_object == "fail" and len(bad):
        first = bad.loc[bad[schema.SOURCE_ROW].idxmin()]
        row = first[schema.SOURCE_ROW]
        raise InputError(
            f"{csv_path} data row {row} (line {row + 2}), {first['reason']}: {first['detail']} "
            "Fix the input, or set ingest.on_bad_object to 'reject' to skip such objects."
        )


def _fail_with_no_objects(csv_path: str, rejects: pd.DataFrame, catalog: Catalog) -> NoReturn:
    """Every row was rejected: keep the rejects for inspection and say why, with an example."""
    sinks.write_parquet(rejects, catalog.rejects, schema.REJECTS_SCHEMA)
    reason = rejects["reason"].value_counts().index[0]
    example = rejects[rejects["reason"] == reason].iloc[0]
    raise InputError(
        f"No object of {csv_path} is left to cluster: all {len(rejects):,} rows were "
        f"rejected, most often as {reason!r} (data row {example[schema.SOURCE_ROW]}: "
        f"{example['detail']}) Fix the input or select.*; every row is listed in {catalog.rejects}."
    )


def read_and_validate(
    csv_path: str,
    select: SelectConfig,
    on_bad_bbox: str,
    staging_path: str,
    block_bytes: int = CSV_BLOCK_BYTES,
    workers: Executor | None = None,
    parts_dir: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Stream the objects CSV through the checks in record batches: on the client, or,
    with ``workers``, as tasks on them (one per range of ``objects.CSV_PARTITION_BYTES``
    of the file; their Arrow files in the folder ``parts_dir``, which the caller removes).

    Returns the candidates (every check passed; a frame over the memory-mapped staging
    file ``staging_path`` or the files in ``parts_dir``, which must outlive it), the
    rejects sorted by ``source_row``, and the number of data rows. The same, whoever
    reads: a file the workers' fast parse refuses is read here instead.
    """
    if workers is not None:
        assert parts_dir is not None
        header = _checked_header(csv_path)  # its one-line errors, before any task
        parts = validate_on_workers(
            workers, csv_path, header, select, on_bad_bbox, parts_dir,
            objects.CSV_PARTITION_BYTES, block_bytes,
        )  # fmt: skip
        n_input_rows = sum(part.n_rows for part in parts or [])
        if n_input_rows:
            candidates, rejects = finish(parts, select)
            return candidates, rejects, n_input_rows
        shutil.rmtree(parts_dir, ignore_errors=True)
        log.info(
            "objects CSV %s: not checked on the workers (the fast parse refused a range, "
            "or no rows); reading it here",
            csv_path,
        )
    rows = CheckedRows(staging_path, select, on_bad_bbox)
    try:
        n_input_rows = stream_objects_csv(csv_path, rows.visit, rows.restart, block_bytes)
    except BaseException:
        rows.restart()  # closes and removes the partial file
        raise
    candidates, rejects = finish([rows.part()], select)
    return candidates, rejects, n_input_rows


@dataclass(frozen=True)
class _Staging:
    """Where one ingest keeps its temporary files, and who reads the embeddings."""

    memmap: str  # the local path's CSV-order vectors
    objects: str  # the checked objects table (Arrow)
    objects_parts: str  # the same, checked on the workers: an Arrow file per range (a folder)
    parts: str  # the workers' staging parts (a folder)
    #: The dask cluster that checks the CSV, reads the embeddings and writes the store;
    #: None: this process.
    workers: Executor | None


class _PathList:
    """A list of paths streamed to a one-column Parquet file in row groups of a fixed size,
    so its bytes do not depend on how the reads were batched (local or on workers)."""

    ROWS = 1 << 16
    SCHEMA = pa.schema([("path", pa.string())])

    def __init__(self, url: str) -> None:
        self.url = url
        self.pending: list[str] = []

    def __enter__(self) -> _PathList:
        self._atomic = store.atomic_path(self.url)
        fs, path = store.filesystem(self._atomic.__enter__())
        self._handle = fs.open(path, "wb")
        self._writer = pq.ParquetWriter(self._handle, self.SCHEMA)
        return self

    def extend(self, paths) -> None:
        self.pending.extend(paths)
        while len(self.pending) >= self.ROWS:
            self._write(self.pending[: self.ROWS])
            del self.pending[: self.ROWS]

    def _write(self, paths: list[str]) -> None:
        self._writer.write_table(pa.table({"path": pa.array(paths, pa.string())}, self.SCHEMA))

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None and self.pending:
                self._write(self.pending)
            self._writer.close()
            self._handle.close()
        finally:
            self._atomic.__exit__(*exc)


def uses_workers(settings: IngestConfig, executor: Executor | None, staging: str) -> bool:
    """Whether the embeddings are read on the workers (``ingest.on_workers``)."""
    has_workers = executor is not None and executor.client is not None
    if settings.on_workers == "auto":
        return has_workers and store.is_local(staging)
    if settings.on_workers and not has_workers:
        raise ConfigError(
            "ingest.on_workers is true, but executor.scheduler runs no dask workers: set it "
            "to 'local-cluster' or a scheduler address, or set ingest.on_workers to auto."
        )
    if settings.on_workers and not store.is_local(staging):
        raise ConfigError(
            must_be(
                "output.staging_dir",
                "a folder path every worker sees (shared storage) when ingest.on_workers is true",
                staging,
            )  # fmt: skip
        )
    return bool(settings.on_workers)


def ingest_objects(
    input: InputConfig,
    select: SelectConfig,
    settings: IngestConfig,
    shuffle_seed: int,
    catalog: Catalog,
    metadata: dict | None = None,
    progress: bool = False,
    run_id: str = "direct",
    executor: Executor | None = None,
) -> IngestResult:
    """Run the ingest and return its counts (outputs are written where ``catalog`` says).

    With a distributed ``executor`` (and ``ingest.on_workers``), the objects CSV is
    checked, the embedding files read and the store chunks written by its workers
    (:mod:`.workers`); else here.

    .. warning:: The staging memmap (``catalog.memmap(run_id)``) takes ``rows x dim x 4``
       bytes of local disk until the Zarr mirror is written (the workers' staging parts
       as much, in ``output.staging_dir``).
    """
    staging = _Staging(
        memmap=catalog.memmap(run_id),
        objects=catalog.objects_staging(run_id),
        objects_parts=catalog.objects_staging_parts(run_id),
        parts=catalog.staging_parts(run_id),
        workers=executor if uses_workers(settings, executor, catalog.staging) else None,
    )
    try:
        return _ingest(input, select, settings, shuffle_seed, catalog, metadata, progress, staging)
    finally:
        Path(staging.objects).unlink(missing_ok=True)
        shutil.rmtree(staging.objects_parts, ignore_errors=True)


def _ingest(
    input: InputConfig,
    select: SelectConfig,
    settings: IngestConfig,
    shuffle_seed: int,
    catalog: Catalog,
    metadata: dict | None,
    progress: bool,
    staging: _Staging,
) -> IngestResult:
    csv_path = input.objects_csv
    candidates, rejects, n_input_rows = read_and_validate(
        csv_path, select, settings.on_bad_bbox, staging.objects,
        workers=staging.workers, parts_dir=staging.objects_parts,
    )  # fmt: skip
    raise_on_bad_object(settings, csv_path, rejects)
    candidates.insert(0, schema.OBJECT_ID, np.arange(len(candidates), dtype=np.int64))
    if len(candidates) == 0:
        _fail_with_no_objects(csv_path, rejects, catalog)

    if input.embeddings_matrix:
        matrix = open_matrix(input.embeddings_matrix, n_input_rows)
        dim = int(matrix.shape[1])
        if settings.dim not in (None, dim):
            raise InputError(
                must_be(
                    f"The dimension of {input.embeddings_matrix}",
                    f"ingest.dim ({settings.dim})",
                    dim,
                )
            )
    else:
        files = FileGroups(candidates, input)
        dim = settings.dim or infer_dim(files)

    # The files the CSV names, listed as they are read: what a rerun fingerprints to
    # notice a changed input (none for a matrix).
    with _PathList(catalog.embedding_files) as read_paths:
        if staging.workers is not None:
            emb_reasons, emb_details, locations = read_on_workers(
                staging.workers, candidates, None if input.embeddings_matrix else files,
                input.embeddings_matrix, dim, staging.parts,
                effective_chunk_rows(settings.chunk_rows, len(candidates)), read_paths,
            )  # fmt: skip
        else:
            memmap = open_memmap(staging.memmap, len(candidates), dim)
            if input.embeddings_matrix:
                emb_reasons, emb_details = fill_memmap_from_matrix(
                    candidates, matrix, memmap, progress
                )
            else:
                emb_reasons, emb_details = fill_memmap_from_files(
                    recording_paths(files.batches(FILES_PER_TASK), read_paths),
                    len(files), len(candidates), memmap, dim, progress,
                )  # fmt: skip
            memmap.flush()
    if not input.embeddings_matrix:
        del files  # it shares columns with the table

    late = rejects_frame(candidates[schema.SOURCE_ROW], candidates, emb_reasons, emb_details)
    rejects = pd.concat([rejects, late], ignore_index=True)
    rejects = rejects.sort_values(schema.SOURCE_ROW, kind="stable", ignore_index=True)
    raise_on_bad_object(settings, csv_path, rejects)
    good_ids = np.flatnonzero(emb_reasons == "")  # object ids are candidate positions
    del emb_reasons, emb_details
    n_rows = len(good_ids)
    if n_rows == 0:
        _fail_with_no_objects(csv_path, rejects, catalog)
    permutation = np.random.default_rng(shuffle_seed).permutation(n_rows)
    store_ids = good_ids[permutation]
    del good_ids, permutation
    chunk_rows = effective_chunk_rows(settings.chunk_rows, n_rows)
    attrs = {
        "n_rows": n_rows,
        "dim": dim,
        "chunk_rows": chunk_rows,
        "shuffle_seed": shuffle_seed,
        "objects_csv": csv_path,
        "config": (metadata or {}).get("config", {}),
        "versions": sinks.package_versions(),
    }
    # Taken from the candidates by id (no copy of the good rows: they are most of them).
    sinks.write_object_parts(candidates, store_ids, catalog.objects, chunk_rows, progress)
    del candidates  # the table is written: free it before the vectors' buffers are taken
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed memory
    if staging.workers is not None:
        write_on_workers(staging.workers, locations, store_ids, catalog.store, dim, chunk_rows,
                         settings.compression, attrs)  # fmt: skip
        if not settings.keep_memmap:
            remove_parts(staging.parts)
    else:
        store.mirror_to_store(
            memmap, store_ids, catalog.store, chunk_rows, settings.compression, attrs, progress
        )
        del memmap
        if not settings.keep_memmap:
            Path(staging.memmap).unlink(missing_ok=True)
    sinks.write_parquet(rejects, catalog.rejects, schema.REJECTS_SCHEMA)
    result = IngestResult(
        n_input_rows=n_input_rows,
        n_rows=n_rows,
        dim=dim,
        chunk_rows=chunk_rows,
        rejected={k: int(v) for k, v in rejects["reason"].value_counts().sort_index().items()},
        memmap=staging.memmap if staging.workers is None else staging.parts,
    )
    summary = {**result.__dict__, "n_rejected": result.n_rejected}
    if not settings.keep_memmap:  # a deleted file's run-specific name is not worth keeping
        summary.pop("memmap")
    catalog.write_ingest_summary(summary)
    return result


def ingest_stage(
    context: StageContext, input: InputConfig, select: SelectConfig, ingest: IngestConfig
) -> IngestResult:
    """The ingest stage, as the runner calls it."""
    return ingest_objects(
        input, select, ingest, context.plan.shuffle_seed, context.catalog, context.metadata,
        progress=context.executor.progress, run_id=context.plan.run_id,
        executor=context.executor,
    )  # fmt: skip
