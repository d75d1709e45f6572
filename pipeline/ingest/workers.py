"""Ingest on the workers of a dask cluster, with the same store bytes as the local path.

The local path reads every embedding file on the client into a memmap, then mirrors it
into the store; at 100M rows that is hours on one machine. Here the client keeps only
what it must (the objects table, the permutation) and passes of tasks do the rest:

0. **check**: the objects CSV is cut at line breaks into byte ranges; each task parses
   one and runs the local path's per-row checks (:func:`~.validate.check_partition`),
   saves the rows that pass as an Arrow file in the staging folder and returns its key
   hashes, selection codes and rejects; the client then finds the repeated objects across
   ranges (:func:`~.validate.finish`). A range the fast parse refuses (quoted line
   breaks, a malformed line) sends the whole file back to the client's own read.
1. **read**: each task reads and checks the embedding files of about one store chunk of
   objects (:func:`~.embeddings.load_batch`, the local path's own checks) and saves the
   good vectors as one staging part (a ``.npy`` in a staging folder every worker sees);
   it returns the positions of its good rows and its rejects. For a single CSV-aligned
   matrix the tasks only check rows: the matrix itself is the staging.
2. **write**: the client draws the local path's seeded permutation of the good rows; each
   store chunk is written by one task that gathers its rows from the parts (memory-mapped
   reads of just those rows) and writes the whole chunk once.

Parts are written to a temporary name and renamed, and each chunk is written whole, so a
task a dead worker left half done is simply run again with the same result.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import zarr

from .. import store
from ..config import SelectConfig
from ..executor import Executor
from .embeddings import FileBatch, FileGroups, check_vectors, load_batch
from .objects import csv_partitions
from .validate import CheckedPart, check_partition


@dataclass(frozen=True)
class Locations:
    """Where each candidate's vector lies after the read pass: ``file[position]`` (an
    index into ``paths``) and ``row[position]`` inside that ``.npy`` (-1: rejected)."""

    paths: list[str]
    file: np.ndarray
    row: np.ndarray


def _save_part(path: str, vectors: np.ndarray) -> None:
    """Write a staging part under a temporary name, then rename (a rerun overwrites)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        np.save(handle, vectors, allow_pickle=False)
    os.replace(tmp, path)


def read_files_part(batch: FileBatch, dim: int, path: str) -> tuple[np.ndarray, list]:
    """Read task: load and check a batch of files, save the good vectors at ``path``."""
    positions, vectors, problems = load_batch(batch.jobs(), dim)
    _save_part(path, vectors)
    return positions, problems


def check_matrix_rows(matrix_path: str, source_rows: np.ndarray) -> tuple[np.ndarray, list]:
    """Read task for a single matrix: the local path's checks on rows ``source_rows``.

    Returns the offsets (into ``source_rows``) of the good rows and the rejects as
    ``[(offsets, reasons, details)]``.
    """
    matrix = np.load(matrix_path, mmap_mode="r", allow_pickle=False)
    block = np.asarray(matrix[source_rows], dtype=np.float32)
    reasons = np.full(len(source_rows), "", dtype=object)
    details = np.full(len(source_rows), "", dtype=object)
    check_vectors(block, reasons, details, lambda i: f"Row {source_rows[i]} of {matrix_path}")
    bad = reasons != ""
    problems = [(np.flatnonzero(bad), reasons[bad], details[bad])] if bad.any() else []
    return np.flatnonzero(~bad), problems


def write_chunk(
    url: str, start: int, ids: np.ndarray, groups: list[tuple[str, np.ndarray, np.ndarray]]
) -> int:
    """Write task: gather one chunk's rows and write the chunk whole.

    ``groups`` holds ``(npy path, rows in it, slots in the chunk)``; rows are read in
    increasing order (sequential pages), then placed at their slots.
    """
    vectors = zarr.open_array(url, path=store.VECTORS, mode="r+")
    block = np.empty((len(ids), vectors.shape[1]), dtype=np.float32)
    for path, rows, slots in groups:
        source = np.load(path, mmap_mode="r", allow_pickle=False)
        order = np.argsort(rows, kind="stable")
        block[slots[order]] = source[rows[order]]
    vectors[start : start + len(ids)] = block
    zarr.open_array(url, path=store.OBJECT_IDS, mode="r+")[start : start + len(ids)] = ids
    return len(ids)


def _task_bounds(counts_before: np.ndarray, target_rows: int) -> list[tuple[int, int]]:
    """Split files into runs of about ``target_rows`` objects (whole files, at least one).

    ``counts_before[f]`` is the number of objects in files before file ``f`` (one more
    entry than files).

    >>> _task_bounds(np.array([0, 3, 5, 9, 10]), 5)
    [(0, 2), (2, 4)]
    >>> _task_bounds(np.array([0, 7, 9]), 5)  # a file bigger than the target: alone
    [(0, 1), (1, 2)]
    """
    n_files, bounds, first = len(counts_before) - 1, [], 0
    while first < n_files:
        last = int(np.searchsorted(counts_before, counts_before[first] + target_rows, "right"))
        last = min(max(last - 1, first + 1), n_files)
        bounds.append((first, last))
        first = last
    return bounds


def in_waves(executor: Executor, tasks: Iterator, desc: str) -> Iterator:
    """Compute lazily made ``tasks`` a wave at a time, yielding results in order: the
    client holds one wave's arguments (file lists, row ids), not the whole input's."""
    wave = min(max(16, 2 * executor.n_cores), 128)
    while batch := list(itertools.islice(tasks, wave)):
        results = executor.compute(*batch, desc=desc)
        yield from [results] if len(batch) == 1 else results


def validate_on_workers(
    executor: Executor,
    csv_path: str,
    header: list[str],
    select: SelectConfig,
    on_bad_bbox: str,
    parts_dir: str,
    partition_bytes: int,
    block_bytes: int,
) -> list[CheckedPart] | None:
    """The check pass: one task per range of about ``partition_bytes`` of the CSV (read
    in blocks of ``block_bytes``). Returns each range's results in file order, or None
    as soon as one range needs the whole file's parse (the caller then reads it)."""
    Path(parts_dir).mkdir(parents=True, exist_ok=True)

    def tasks() -> Iterator:
        for i, (start, end) in enumerate(csv_partitions(csv_path, partition_bytes)):
            path = os.path.join(parts_dir, f"part-{i:06d}.arrow")
            yield dask.delayed(check_partition, pure=False)(
                csv_path, header, start, end, select, on_bad_bbox, path, block_bytes
            )

    parts: list[CheckedPart] = []
    for part in in_waves(executor, tasks(), "ingest: check objects"):
        if part is None:
            return None
        parts.append(part)
    return parts


def read_on_workers(
    executor: Executor,
    candidates: pd.DataFrame,
    files: FileGroups | None,
    matrix_path: str | None,
    dim: int,
    parts_dir: str,
    task_rows: int,
    read_paths,
) -> tuple[np.ndarray, np.ndarray, Locations]:
    """The read pass, tasks of about ``task_rows`` objects. Returns the reason and detail
    per candidate ('' = good) and where each good row lies; the embedding files go to
    ``read_paths.extend`` in read order (none for a matrix)."""
    n = len(candidates)
    reasons = np.full(n, "", dtype=object)
    details = np.full(n, "", dtype=object)
    file_of = np.full(n, -1, dtype=np.int32)
    row_of = np.full(n, -1, dtype=np.int64)
    if matrix_path is not None:
        source = candidates["source_row"].to_numpy()
        starts = range(0, n, task_rows)
        tasks = (dask.delayed(check_matrix_rows, pure=False)(matrix_path, source[a : a + task_rows])
                 for a in starts)  # fmt: skip
        for a, (good, problems) in zip(starts, in_waves(executor, tasks, "ingest: check rows"),
                                       strict=True):  # fmt: skip
            file_of[a + good] = 0
            row_of[a + good] = source[a + good]
            for offsets, why, detail in problems:
                reasons[a + offsets], details[a + offsets] = why, detail
        return reasons, details, Locations([matrix_path], file_of, row_of)

    assert files is not None
    Path(parts_dir).mkdir(parents=True, exist_ok=True)
    bounds = _task_bounds(files.starts, task_rows)
    part_paths = [os.path.join(parts_dir, f"part-{i:06d}.npy") for i in range(len(bounds))]

    def tasks() -> Iterator:
        for (first, last), path in zip(bounds, part_paths, strict=True):
            batch = files.batch(first, last)
            read_paths.extend(batch.paths)
            yield dask.delayed(read_files_part, pure=False)(batch, dim, path)

    for i, (positions, problems) in enumerate(
        in_waves(executor, tasks(), "ingest: read embeddings")
    ):
        file_of[positions] = i
        row_of[positions] = np.arange(len(positions))
        for bad_positions, why, detail in problems:
            reasons[bad_positions], details[bad_positions] = why, detail
    return reasons, details, Locations(part_paths, file_of, row_of)


def write_on_workers(
    executor: Executor,
    locations: Locations,
    store_ids: np.ndarray,
    url: str,
    dim: int,
    chunk_rows: int,
    compression: str,
    attrs: dict,
) -> None:
    """The write pass: the store at ``url``, chunk ``c`` holding rows ``store_ids[c]``."""
    n_rows = len(store_ids)
    with store.atomic_path(url) as tmp:
        store.create_store(tmp, n_rows, dim, chunk_rows, compression, attrs)

        def tasks() -> Iterator:
            for start in range(0, n_rows, chunk_rows):
                ids = store_ids[start : start + chunk_rows]
                files, rows = locations.file[ids], locations.row[ids]
                order = np.argsort(files, kind="stable")
                cuts = np.flatnonzero(np.diff(files[order])) + 1
                groups = [
                    (locations.paths[int(files[slots[0]])], rows[slots], slots)
                    for slots in np.split(order, cuts)
                ]
                yield dask.delayed(write_chunk, pure=False)(tmp, start, ids, groups)

        for _ in in_waves(executor, tasks(), "ingest: write zarr"):
            pass


def remove_parts(parts_dir: str) -> None:
    shutil.rmtree(parts_dir, ignore_errors=True)
