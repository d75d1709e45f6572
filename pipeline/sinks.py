"""Writers and readers of the tabular outputs: Parquet with an explicit schema and run
metadata, and the write-up's CSV. Every write is atomic (temporary path, then rename).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import schema
from .store import atomic_path, filesystem, join, run_chunks

METADATA_KEY = b"pipeline"
_PACKAGES = ("numpy", "dask", "distributed", "zarr", "scikit-learn", "pandas", "pyarrow")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the results, recorded in every output."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:  # pragma: no cover - all are dependencies
            versions[name] = "missing"
    return versions


def _with_metadata(schema: pa.Schema, run_metadata: dict[str, Any] | None) -> pa.Schema:
    if not run_metadata:
        return schema
    payload = json.dumps(run_metadata, sort_keys=True, default=str).encode()
    return schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: payload})


def to_table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Convert ``frame`` to Arrow: ``schema``'s columns first with their declared types,
    then any extra (carried-through) columns with inferred types."""
    extra = [c for c in frame.columns if c not in schema.names]
    declared = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    for name in extra:
        declared = declared.append_column(name, pa.array(frame[name], from_pandas=True))
    return declared


def write_parquet(
    frame: pd.DataFrame | pa.Table,
    url: str,
    schema: pa.Schema,
    run_metadata: dict[str, Any] | None = None,
) -> str:
    """Write one Parquet file atomically with ``schema`` and the run metadata."""
    schema = _with_metadata(schema, run_metadata)
    table = frame if isinstance(frame, pa.Table) else to_table(frame, schema)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), **(schema.metadata or {})}
    )
    fs, _ = filesystem(url)
    with atomic_path(url) as tmp:
        _, tmp_path = filesystem(tmp)
        with fs.open(tmp_path, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
    return url


def write_parquet_dataset(
    frame: dd.DataFrame,
    url: str,
    schema: pa.Schema,
    run_metadata: dict[str, Any] | None = None,
    compute: Callable[[Any], Any] | None = None,
) -> None:
    """Write a dask frame as a folder of Parquet parts, one per partition, in parallel.

    ``compute`` runs the lazy write (e.g. the executor's, with its progress bar); the
    default is ``dask.compute``. The parts go to a temporary folder moved into place once
    all are written. The workers write their own parts, so on a cluster ``url`` must be
    shared storage.
    """
    schema = _with_metadata(schema, run_metadata)
    with atomic_path(url) as tmp:
        graph = frame.to_parquet(
            tmp,
            schema=schema,
            write_index=False,
            compression="zstd",
            compute=False,
            write_metadata_file=False,
            name_function=lambda i: f"part-{i:05d}.parquet",
        )
        (compute or dask.compute)(graph)


def read_parquet(
    url: str, columns: list[str] | None = None, filters: list[tuple] | None = None
) -> pd.DataFrame:
    """Read a Parquet file or folder into pandas (small tables only); ``filters`` are
    pyarrow row filters such as ``[("cluster", "in", [3, 17])]``."""
    fs, path = filesystem(url)
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filters).to_pandas()


def read_run_metadata(url: str) -> dict[str, Any]:
    """The run metadata stored in a Parquet file's schema."""
    fs, path = filesystem(url)
    if fs.isdir(path):
        path = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))[0]
    with fs.open(path, "rb") as handle:
        metadata = pq.read_schema(handle).metadata or {}
    return json.loads(metadata.get(METADATA_KEY, b"{}"))


def write_csv(frame: pd.DataFrame, url: str, columns: tuple[str, ...], schema: pa.Schema) -> str:
    """Write exactly ``columns`` as CSV (header, comma; text values quoted), atomically."""
    table = to_table(frame[list(columns)], pa.schema([schema.field(c) for c in columns]))
    fs, _ = filesystem(url)
    with atomic_path(url) as tmp:
        _, tmp_path = filesystem(tmp)
        with fs.open(tmp_path, "wb") as handle:
            pacsv.write_csv(
                table, handle, pacsv.WriteOptions(quoting_style="needed", include_header=True)
            )
    return url


def write_json(payload: Any, url: str) -> str:
    """Write a JSON document atomically."""
    fs, _ = filesystem(url)
    with atomic_path(url) as tmp:
        _, tmp_path = filesystem(tmp)
        with fs.open(tmp_path, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True, default=str)
    return url


def write_text(text: str, url: str) -> str:
    """Write a text file atomically."""
    fs, _ = filesystem(url)
    with atomic_path(url) as tmp:
        _, tmp_path = filesystem(tmp)
        with fs.open(tmp_path, "w") as handle:
            handle.write(text)
    return url


def read_json(url: str) -> Any:
    fs, path = filesystem(url)
    with fs.open(path, "r") as handle:
        return json.load(handle)


def part_urls(url: str) -> list[str]:
    """The ``part-*.parquet`` files of a Parquet folder, in part order."""
    fs, path = filesystem(url)
    names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    return [fs.unstrip_protocol(p) if "://" in url else p for p in names]


def read_parquet_part(url: str, part: int) -> pd.DataFrame:
    """Read part ``part`` of a Parquet folder written by this package."""
    return read_parquet(f"{url.rstrip('/')}/part-{part:05d}.parquet")


class ArrowRows:
    """``frame.take(rows)`` for a frame of many-chunk Arrow columns (a table read back
    from an Arrow file), without the cost pandas and Arrow pay there: they concatenate
    every chunk of every column on each call (~35 ms per string column at 1M rows, and as
    much memory). Here each record batch takes its own rows, and only those are joined.
    """

    def __init__(self, frame: pd.DataFrame) -> None:
        self.batches = pa.Table.from_pandas(frame, preserve_index=False).to_batches()
        self.offsets = np.cumsum([0, *(len(batch) for batch in self.batches)])

    def __call__(self, rows: np.ndarray) -> pd.DataFrame:
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        cuts = np.searchsorted(ordered, self.offsets)
        pieces = [
            batch.take(pa.array(ordered[cuts[i] : cuts[i + 1]] - self.offsets[i]))
            for i, batch in enumerate(self.batches)
            if cuts[i + 1] > cuts[i]
        ]
        schema = self.batches[0].schema if self.batches else None
        table = pa.Table.from_batches(pieces, schema).combine_chunks()
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return table.take(pa.array(inverse)).to_pandas()


def write_object_parts(
    objects: pd.DataFrame, store_ids: np.ndarray, url: str, chunk_rows: int, progress: bool
) -> None:
    """The objects table in store order, one ``part-<chunk>.parquet`` per store chunk, so it
    is row-aligned with the store and its partitions match the store's blocks."""
    object_ids = objects["object_id"].to_numpy()  # increasing: rows are in CSV order
    take = ArrowRows(objects)
    with atomic_path(url) as tmp:
        fs, tmp_path = filesystem(tmp)
        fs.makedirs(tmp_path, exist_ok=True)

        def write_part(c: int) -> None:
            ids = store_ids[c * chunk_rows : (c + 1) * chunk_rows]
            write_parquet(
                take(np.searchsorted(object_ids, ids)),
                join(tmp, f"part-{c:05d}.parquet"),
                schema.OBJECTS_SCHEMA,
            )

        run_chunks(write_part, math.ceil(len(store_ids) / chunk_rows), "ingest: objects", progress)


# ----------------------------------------------------------------------------- streamed
# writers: a large table written piece by piece (post-processing's external sort), with the
# same bytes as the one-call writers above.

#: Rows per row group of :func:`write_parquet_pieces` (pyarrow's own default is 1,048,576,
#: which would hold up to that many rows in memory): a file of at most this many rows has
#: the bytes :func:`write_parquet` gives the whole table.
PIECES_ROW_GROUP_ROWS = 65_536


def csv_bytes(
    frame: pd.DataFrame, columns: tuple[str, ...], schema: pa.Schema, header: bool
) -> bytes:
    """What :func:`write_csv` writes for ``frame``, with or without the header line: the
    CSV of a table cut into row ranges is the header, then each range's rows."""
    table = to_table(frame[list(columns)], pa.schema([schema.field(c) for c in columns]))
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink, pacsv.WriteOptions(quoting_style="needed", include_header=header))
    return sink.getvalue().to_pybytes()


def concat_files(urls: list[str], url: str, head: bytes = b"", block_bytes: int = 1 << 22) -> str:
    """Write ``head`` then the bytes of every file of ``urls`` in order to ``url``,
    atomically, a block at a time."""
    fs, _ = filesystem(url)
    with atomic_path(url) as tmp:
        _, tmp_path = filesystem(tmp)
        with fs.open(tmp_path, "wb") as out:
            out.write(head)
            for piece in urls:
                piece_fs, piece_path = filesystem(piece)
                with piece_fs.open(piece_path, "rb") as handle:
                    while block := handle.read(block_bytes):
                        out.write(block)
    return url


def write_ipc_batches(batches: list[pa.RecordBatch], schema: pa.Schema, url: str) -> str:
    """An Arrow IPC file holding exactly ``batches`` (empty ones too), so that batch ``i``
    is read back alone with :func:`read_ipc_batch` (staging files; not atomic)."""
    fs, path = filesystem(url)
    with fs.open(path, "wb") as handle, pa.ipc.new_file(handle, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return url


def read_ipc_batch(url: str, index: int) -> pa.RecordBatch:
    """Batch ``index`` of an Arrow IPC file (memory-mapped when local: page cache, not
    private memory)."""
    fs, path = filesystem(url)
    if "file" in fs.protocol or "local" in fs.protocol:
        with pa.memory_map(path) as source:
            return pa.ipc.open_file(source).get_batch(index)
    with fs.open(path, "rb") as handle:
        return pa.ipc.open_file(pa.BufferReader(handle.read())).get_batch(index)


def write_ipc_table(table: pa.Table, url: str) -> str:
    """One table as an Arrow IPC file (staging; not atomic)."""
    fs, path = filesystem(url)
    with fs.open(path, "wb") as handle, pa.ipc.new_file(handle, table.schema) as writer:
        writer.write_table(table)
    return url


def read_ipc_table(url: str) -> pa.Table:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as handle:
        return pa.ipc.open_file(pa.BufferReader(handle.read())).read_all()


def unify_piece_schemas(schemas: list[pa.Schema]) -> pa.Schema:
    """The schema of the whole table from the schemas its pieces' conversions from pandas
    inferred: a carried column all null in one piece is ``null`` there, an integer column
    with nulls in one piece is ``double`` there (pandas holds it as float), so ``null``
    gives way to any type and integers to ``double``, as the whole table's conversion
    would give. The first schema's metadata is kept."""
    if not schemas:
        raise ValueError("No schemas to unify.")
    unified = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    fields = []
    for field in unified:
        types = {s.field(field.name).type for s in schemas} - {pa.null()}
        if len(types) > 1 and all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in types):
            field = field.with_type(pa.float64())
        fields.append(field)
    return pa.schema(fields, metadata=schemas[0].metadata)


def write_parquet_pieces(
    pieces: Any,
    url: str,
    schema: pa.Schema,
    run_metadata: dict[str, Any] | None = None,
    row_group_rows: int = PIECES_ROW_GROUP_ROWS,
) -> str:
    """Write the tables ``pieces`` (an iterable, read one at a time) as one Parquet file,
    atomically, in row groups of ``row_group_rows`` rows cut wherever the pieces end: the
    file reads back as their concatenation cast to ``schema`` (its metadata then the run's
    kept), and with no more rows than ``row_group_rows`` it has :func:`write_parquet`'s
    bytes for that table. Holds at most one row group and one piece in memory."""
    # The run metadata's key first, as write_parquet's conversion from pandas orders them
    # (the order is in the file's bytes).
    run = _with_metadata(pa.schema([]), run_metadata).metadata or {}
    schema = schema.with_metadata({**run, **(schema.metadata or {}), **run})
    fs, _ = filesystem(url)
    with atomic_path(url) as tmp:
        _, tmp_path = filesystem(tmp)
        with fs.open(tmp_path, "wb") as handle:
            with pq.ParquetWriter(handle, schema, compression="zstd") as writer:
                buffered: list[pa.Table] = []
                n_buffered = written = 0
                for piece in pieces:
                    buffered.append(piece.cast(schema))
                    n_buffered += piece.num_rows
                    while n_buffered >= row_group_rows:
                        table = pa.concat_tables(buffered).combine_chunks()
                        writer.write_table(table.slice(0, row_group_rows))
                        written += row_group_rows
                        rest = table.slice(row_group_rows)
                        buffered, n_buffered = [rest], rest.num_rows
                if n_buffered or not written:  # an empty table: as write_parquet writes it
                    rest = pa.concat_tables(buffered) if buffered else schema.empty_table()
                    writer.write_table(rest.combine_chunks())
    return url
