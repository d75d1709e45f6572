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

from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
import pyarrow as pa

from .. import schema, sinks, store
from ..catalog import Catalog
from ..config import IngestConfig, InputConfig, SelectConfig
from ..context import StageContext
from ..errors import InputError, must_be
from ..plan import effective_chunk_rows
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
from .objects import read_objects_csv, rejects_frame, validate_rows

__all__ = ["IngestResult", "ingest_objects", "ingest_stage", "read_objects_csv", "validate_rows"]


@dataclass(frozen=True)
class IngestResult:
    """Counts of one ingest; every input row is either ingested or rejected."""

    n_input_rows: int
    n_rows: int
    dim: int
    chunk_rows: int
    rejected: dict[str, int]
    #: The staging memmap (CSV order); deleted after the mirror unless ingest.keep_memmap.
    memmap: str

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


def _raise_on_bad_object(settings: IngestConfig, csv_path: str, rejects: pd.DataFrame) -> None:
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


def ingest_objects(
    input: InputConfig,
    select: SelectConfig,
    settings: IngestConfig,
    shuffle_seed: int,
    catalog: Catalog,
    metadata: dict | None = None,
    progress: bool = False,
    run_id: str = "direct",
) -> IngestResult:
    """Run the ingest and return its counts (outputs are written where ``catalog`` says).

    .. warning:: The staging memmap (``catalog.memmap(run_id)``) takes ``rows x dim x 4``
       bytes of local disk until the Zarr mirror is written.
    """
    memmap_path = catalog.memmap(run_id)
    csv_path = input.objects_csv
    raw = read_objects_csv(csv_path)
    n_input_rows = len(raw)
    typed, reasons, details = validate_rows(raw, select, settings.on_bad_bbox)
    typed.insert(0, schema.SOURCE_ROW, np.arange(len(typed), dtype=np.int64))
    rejects = rejects_frame(typed[schema.SOURCE_ROW], raw, reasons.to_numpy(), details.to_numpy())
    _raise_on_bad_object(settings, csv_path, rejects)
    clean = reasons.to_numpy() == ""
    candidates = typed if clean.all() else typed[clean]  # no copy of a clean table
    candidates.insert(0, schema.OBJECT_ID, np.arange(len(candidates), dtype=np.int64))
    del raw, typed, reasons, details, clean  # the table is held once from here on
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

    memmap = open_memmap(memmap_path, len(candidates), dim)
    if input.embeddings_matrix:
        emb_reasons, emb_details = fill_memmap_from_matrix(candidates, matrix, memmap, progress)
        read_paths: list[str] = []  # one matrix: no per-image files
    else:
        read_paths = []
        emb_reasons, emb_details = fill_memmap_from_files(
            recording_paths(files.batches(FILES_PER_TASK), read_paths),
            len(files), len(candidates), memmap, dim, progress,
        )  # fmt: skip
        del files  # it shares columns with the table
    # The files the CSV names: what a rerun fingerprints to notice a changed input.
    sinks.write_parquet(
        pa.table({"path": pa.array(read_paths, pa.string())}), catalog.embedding_files,
        pa.schema([("path", pa.string())]),
    )  # fmt: skip
    del read_paths
    memmap.flush()

    late = rejects_frame(candidates[schema.SOURCE_ROW], candidates, emb_reasons, emb_details)
    rejects = pd.concat([rejects, late], ignore_index=True)
    rejects = rejects.sort_values(schema.SOURCE_ROW, kind="stable", ignore_index=True)
    _raise_on_bad_object(settings, csv_path, rejects)
    good = emb_reasons == ""
    objects = candidates if good.all() else candidates[good]
    del candidates
    n_rows = len(objects)
    if n_rows == 0:
        _fail_with_no_objects(csv_path, rejects, catalog)
    permutation = np.random.default_rng(shuffle_seed).permutation(n_rows)
    store_ids = objects[schema.OBJECT_ID].to_numpy()[permutation]
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
    sinks.write_object_parts(objects, store_ids, catalog.objects, chunk_rows, progress)
    del objects  # the table is written: free it before the vectors' buffers are taken
    pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed memory
    store.mirror_to_store(
        memmap, store_ids, catalog.store, chunk_rows, settings.compression, attrs, progress
    )
    del memmap
    if not settings.keep_memmap:
        Path(memmap_path).unlink(missing_ok=True)
    sinks.write_parquet(rejects, catalog.rejects, schema.REJECTS_SCHEMA)
    result = IngestResult(
        n_input_rows=n_input_rows,
        n_rows=n_rows,
        dim=dim,
        chunk_rows=chunk_rows,
        rejected={k: int(v) for k, v in rejects["reason"].value_counts().sort_index().items()},
        memmap=memmap_path,
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
    )  # fmt: skip
