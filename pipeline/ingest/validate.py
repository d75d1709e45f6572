"""Validate the objects CSV: batch by batch, then once over the whole file.

The ingest streams the CSV through the checks either on the client (the local path,
:func:`pipeline.ingest.read_and_validate`) or as one task per byte range of the file on
the dask workers (:func:`pipeline.ingest.workers.validate_on_workers`, each task running
:func:`check_partition`). Both do the per-batch work with :class:`CheckedRows` and the
global step (repeated objects across the file, selection) with :func:`finish`, so the
candidates and the rejects are the same whichever way the file was cut.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .. import schema
from ..config import SelectConfig
from ..errors import InputError
from .objects import (
    SELECTION_REASONS,
    _record_batches,
    check_rows,
    duplicate_detail,
    first_of_each_key,
    holds_line_break,
    key_hashes,
    rejects_frame,
    selection_codes,
    selection_detail,
)


@dataclass(frozen=True)
class CheckedPart:
    """What the checks of consecutive data rows leave: the rows that pass in an Arrow
    file (``path``; None when there were no rows), and per such row its key hash and
    selection code; the rejects. ``source_row`` counts from the part's first row."""

    path: str | None
    n_rows: int
    hashes: np.ndarray
    codes: np.ndarray
    rejects: pd.DataFrame | None


class CheckedRows:
    """The per-row checks of a stream of batches of consecutive data rows: the rows that
    pass go to an Arrow file at ``path`` (``source_row`` first, counted from 0), their
    key hashes and selection codes stay in memory (9 bytes a row), rejects are kept as
    they are found. Every batch is written with the first batch's Arrow schema.
    """

    def __init__(self, path: str, select: SelectConfig, on_bad_bbox: str) -> None:
        self.path, self.select, self.on_bad_bbox = path, select, on_bad_bbox
        self.restart()

    def restart(self) -> None:
        """Forget every batch seen and remove the file (a new attempt starts)."""
        self.close()
        Path(self.path).unlink(missing_ok=True)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.writer: pa.ipc.RecordBatchFileWriter | None = None
        self.n_rows = 0
        self.rejects: list[pd.DataFrame] = []
        self.hashes: list[np.ndarray] = []
        self.codes: list[np.ndarray] = []

    def close(self) -> None:
        if getattr(self, "writer", None) is not None:
            self.writer.close()
            self.writer = None

    def visit(self, raw: pd.DataFrame) -> None:
        """Check one batch (a frame of text columns, the rows after those seen so far)."""
        raw.index = pd.RangeIndex(self.n_rows, self.n_rows + len(raw))
        self.n_rows += len(raw)
        typed, reasons, details = check_rows(raw, self.on_bad_bbox)
        typed.insert(0, schema.SOURCE_ROW, raw.index.to_numpy(dtype=np.int64))
        bad = reasons.to_numpy() != ""
        if bad.any():
            self.rejects.append(
                rejects_frame(typed[schema.SOURCE_ROW], raw, reasons.to_numpy(), details.to_numpy())
            )
        clean = typed[~bad] if bad.any() else typed
        self.hashes.append(key_hashes(clean))
        self.codes.append(selection_codes(clean, self.select))
        table = pa.Table.from_pandas(clean, preserve_index=False)
        if self.writer is None:
            self.schema = table.schema
            self.writer = pa.ipc.new_file(self.path, self.schema)
        self.writer.write_table(table.cast(self.schema))
        del table, typed, clean, raw
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed blocks

    def part(self, path: str | None = None) -> CheckedPart:
        """Close the file and hand over what was kept (the file renamed to ``path``)."""
        self.close()
        found = self.n_rows > 0  # every batch seen was written, its first made the file
        if path is not None and found:
            os.replace(self.path, path)
        part = CheckedPart(
            path=(path or self.path) if found else None,
            n_rows=self.n_rows,
            hashes=_joined(self.hashes, np.uint64),
            codes=_joined(self.codes, np.int8),
            rejects=pd.concat(self.rejects, ignore_index=True) if self.rejects else None,
        )
        self.hashes, self.codes, self.rejects = [], [], []
        return part


def _joined(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=dtype)


def check_partition(
    csv_path: str,
    header: list[str],
    start: int,
    end: int,
    select: SelectConfig,
    on_bad_bbox: str,
    path: str,
    block_bytes: int,
) -> CheckedPart | None:
    """Task: read bytes ``start:end`` of the CSV (a range of whole lines; from 0, with the
    header) with the fast parse and check its rows (``source_row`` counted from the
    range's first row); the rows that pass are saved at ``path`` (written under a
    temporary name, then renamed, so a rerun overwrites).

    Returns None where the fast parse refuses the range or a value holds a line break:
    the caller then reads the whole file the local way, and its results or errors.
    """
    rows = CheckedRows(f"{path}.tmp-{os.getpid()}", select, on_bad_bbox)
    try:
        for batch in _record_batches(Path(csv_path), header, True, block_bytes, start, end):
            if holds_line_break(batch):
                rows.restart()
                return None
            if batch.num_rows:
                rows.visit(batch.to_pandas())
    except (pa.ArrowException, InputError):
        rows.restart()
        return None
    finally:
        rows.close()
    return rows.part(path)


def read_parts(parts: list[CheckedPart]) -> pd.DataFrame:
    """The rows that passed, in file order, as a frame over the memory-mapped files (so
    the table does not sit in private memory whole); each part's ``source_row`` is
    offset by the rows of the parts before it and its table cast to the first's schema."""
    tables, first_row, schema_ = [], 0, None
    for part in parts:
        if part.path is not None:
            table = pa.ipc.open_file(pa.memory_map(part.path)).read_all()
            schema_ = schema_ or table.schema
            table = table.cast(schema_)
            if first_row:
                column = table.schema.get_field_index(schema.SOURCE_ROW)
                shifted = pc.add(table.column(column), pa.scalar(first_row, pa.int64()))
                table = table.set_column(column, schema_.field(column), shifted)
            tables.append(table)
        first_row += part.n_rows
    if not tables:
        raise ValueError("no rows to read: the caller checks that the file has rows")
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    del tables
    return table.to_pandas()


def finish(parts: list[CheckedPart], select: SelectConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The global step over the parts of a file, in order: the candidates (rows that pass
    every check, memory-mapped, in file order) and the rejects sorted by ``source_row``.

    Repeated objects are found across parts from the key hashes (then compared exactly):
    the first copy is kept. Rows that pass everything else but not ``select.*`` follow.
    """
    frame = read_parts(parts)
    hashes = _joined([p.hashes for p in parts], np.uint64)
    codes = _joined([p.codes for p in parts], np.int8)
    rejects: list[pd.DataFrame] = []
    first_row = 0
    for part in parts:
        if part.rejects is not None:
            if first_row:
                part.rejects[schema.SOURCE_ROW] += first_row
            rejects.append(part.rejects)
        first_row += part.n_rows
    parts.clear()  # the caller's results: their arrays are now held here only
    # Repeated objects: rows whose key hash repeats, then compared exactly.
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    repeats = np.zeros(len(hashes), dtype=bool)
    same = sorted_hashes[1:] == sorted_hashes[:-1]
    repeats[order[1:][same]] = True
    repeats[order[:-1][same]] = True
    suspects = np.flatnonzero(repeats)  # increasing: file order
    dup = np.zeros(len(hashes), dtype=bool)
    details: list[str] = []
    if len(suspects):
        keys = frame.iloc[suspects][["username", "image_name", "idx"]].reset_index(drop=True)
        first = suspects[first_of_each_key(keys)]
        repeated = first != suspects
        dup[suspects[repeated]] = True
        source = frame[schema.SOURCE_ROW].to_numpy()
        details = [
            duplicate_detail(tuple(keys.iloc[i]), int(source[first[i]]))
            for i in np.flatnonzero(repeated)
        ]
    reasons = np.where(dup, "duplicate_object", np.asarray(SELECTION_REASONS, dtype=object)[codes])
    detail = np.full(len(hashes), "", dtype=object)
    detail[dup] = details
    for code in (1, 2):
        detail[~dup & (codes == code)] = selection_detail(code, select)
    late = reasons != ""
    if late.any():
        picked = frame[late]
        rejects.append(
            rejects_frame(picked[schema.SOURCE_ROW], picked, reasons[late], detail[late])
        )
        frame = frame[~late]
    found = (
        pd.concat(rejects, ignore_index=True)
        if rejects
        else rejects_frame(frame[schema.SOURCE_ROW].iloc[:0], frame.iloc[:0],
                           np.array([], dtype=object), np.array([], dtype=object))
    )  # fmt: skip
    del rejects
    found = found.sort_values(schema.SOURCE_ROW, kind="stable", ignore_index=True)
    return frame.reset_index(drop=True), found
